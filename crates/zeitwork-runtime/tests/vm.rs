//! The QEMU microVM driver with real parts: an image from a real registry as
//! an ext4 disk, the host's Debian cloud kernel and Zeitwork's initramfs,
//! QEMU `-M microvm` (KVM when the probe shows it works, TCG otherwise), a tap
//! device. Needs root, qemu-system-x86, linux-image-cloud-amd64 and
//! busybox-static (`scripts/test-deps` installs them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeitwork_image::{ImageStore, Limits, RegistryConfig};
use zeitwork_runtime::logs::LogStore;
use zeitwork_runtime::select::{select, SelectOptions};
use zeitwork_runtime::{AnyRuntime, InstanceSpec, InstanceState, Runtime};
use zeitwork_testkit::Registry;

fn options(dir: &Path, base: &str) -> SelectOptions {
    SelectOptions {
        requested: "qemu".into(),
        dir: dir.to_owned(),
        oci_runtime: PathBuf::from("runc"),
        qemu: PathBuf::from("qemu-system-x86_64"),
        firecracker: None,
        jailer: None,
        kernel: None,
        base: base.parse().unwrap(),
        disk_budget: 1 << 30,
        vmm_user: Some(VMM_USER),
        confinement: Default::default(),
    }
}

/// QEMU's users in these tests (the node agent's default range).
const VMM_USER: zeitwork_runtime::vm::VmmUser = zeitwork_runtime::vm::VmmUser { uid: 900_000, gid: 900_000 };

struct World {
    _reg: Registry,
    dir: tempfile::TempDir,
    images: ImageStore,
    runtime: AnyRuntime,
    reference: String,
    logs: Arc<LogStore>,
}

async fn world(script: &str, base: &str) -> World {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Traverse-only, as a node's data directory is: QEMU's users reach their own VM's directory.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let logs = Arc::new(LogStore::new(&dir.path().join("logs")).unwrap());
    let selected = select(&options(dir.path(), base), logs.clone())
        .await
        .expect("qemu-system-x86 and a guest kernel are needed (scripts/test-deps installs them)");
    eprintln!("runtime: {} ({})", selected.name, selected.detail);
    let reference = reg.push_busybox("test/vm", "v1", script).await.unwrap();
    World { _reg: reg, dir, images, runtime: selected.runtime, reference, logs }
}

async fn spec(w: &World, id: &str) -> InstanceSpec {
    let image = w.images.prepare(&w.reference).await.unwrap();
    let disk = w.images.ext4(&image).await.unwrap();
    InstanceSpec {
        id: id.into(),
        rootfs: image.rootfs.clone(),
        image: image.config.clone(),
        env: vec![("GREETING".into(), "hi from the project".into())],
        port: 8080,
        vcpu: 1,
        memory_mib: 128,
        disk: Some(disk),
        dns_search: None,
    }
}

fn link_exists(name: &str) -> bool {
    std::process::Command::new("ip").args(["link", "show", name]).output().is_ok_and(|o| o.status.success())
}

async fn wait_for_http(w: &World, id: &str, url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match reqwest::get(url).await {
            Ok(r) if r.status().is_success() => return r.text().await.unwrap(),
            _ if Instant::now() < deadline && w.runtime.state(id).await.ok() == Some(InstanceState::Running) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            other => panic!(
                "the VM never answered: {other:?}; state {:?}; console {:?}",
                w.runtime.state(id).await,
                w.runtime.diagnose(id).await
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_serves_http_logs_and_stops_gracefully() {
    let w = world(
        "echo booting $GREETING; echo warn >&2; /bin/busybox httpd -f -p $PORT -h /www & \
         trap 'echo got SIGTERM; kill $!; exit 0' TERM; wait",
        "10.209.0.0",
    )
    .await;
    let id = "ins_vm_serves";
    let s = spec(&w, id).await;
    let running = w.runtime.start(&s).await.unwrap();
    assert!(running.address.ip().to_string().starts_with("10.209."), "{}", running.address);
    let tap = std::fs::read_to_string(w.dir.path().join("vms").join(id).join("tap")).unwrap();
    assert!(link_exists(&tap), "tap {tap} exists while the VM runs");
    // The config disk holds the env: never the kernel command line.
    let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ps.stdout).contains("hi from the project"), "env leaked into a command line");

    let body = wait_for_http(&w, id, &format!("http://{}/", running.address)).await;
    assert_eq!(body, "hello from a container\n");

    // QEMU runs as the VM's own unprivileged user (real, effective, saved and
    // file-system ids alike), and owns only its directory and configuration disk.
    let vm_dir = w.dir.path().join("vms").join(id);
    let pid = std::fs::read_to_string(vm_dir.join("vmm.pid")).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.trim())).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("{key} in {status}"));
        line[key.len()..].split_whitespace().map(|v| v.parse().unwrap()).collect()
    };
    let uids = ids("Uid:");
    assert!(uids.iter().all(|u| *u == uids[0]), "{uids:?}");
    assert!((VMM_USER.uid..VMM_USER.uid + 16_000).contains(&uids[0]), "QEMU runs as {uids:?}");
    assert_eq!(ids("Gid:"), vec![VMM_USER.gid; 4]);
    assert_eq!(ids("Groups:"), Vec::<u32>::new(), "no supplementary groups");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let config = std::fs::metadata(vm_dir.join("config.img")).unwrap();
    assert_eq!((config.uid(), config.mode() & 0o777), (uids[0], 0o600));
    let own = std::fs::metadata(&vm_dir).unwrap();
    assert_eq!((own.uid(), own.permissions().mode() & 0o777), (uids[0], 0o700));
    let tap_owner = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).unwrap();
    assert_eq!(tap_owner.trim(), uids[0].to_string(), "the tap is the VM user's own");
    let shared = std::fs::metadata(vm_dir.join("f2")).unwrap();
    assert_ne!(shared.uid(), uids[0], "the shared image is linked, never handed over");

    let stats = w.runtime.stats(id).await.unwrap();
    assert!(stats.memory_bytes > 0 && stats.memory_limit_bytes == 128 << 20, "{stats:?}");

    let exit = w.runtime.stop(id, Duration::from_secs(2)).await.unwrap();
    assert_eq!(exit.code, Some(0), "the app's own exit after SIGTERM: {exit:?}");
    let lines: Vec<(String, String)> =
        w.runtime.logs(id).await.unwrap().into_iter().map(|l| (l.stream, l.line)).collect();
    assert!(lines.contains(&("stdout".into(), "booting hi from the project".into())), "{lines:?}");
    assert!(lines.contains(&("stderr".into(), "warn".into())), "{lines:?}");
    assert!(lines.contains(&("stdout".into(), "got SIGTERM".into())), "the app saw SIGTERM: {lines:?}");

    w.runtime.destroy(id).await.unwrap();
    assert!(!link_exists(&tap), "tap {tap} removed");
    assert!(!w.dir.path().join("vms").join(id).exists());
    assert!(w.logs.exists(id), "logs outlive the instance");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_and_bad_commands_end_with_a_readable_reason() {
    let w = world("echo about to fail; exit 3", "10.224.0.0").await;
    let id = "ins_vm_crash";
    let s = spec(&w, id).await;
    w.runtime.start(&s).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let InstanceState::Exited(e) = w.runtime.state(id).await.unwrap() {
            break e;
        }
        assert!(Instant::now() < deadline, "the VM did not end: {:?}", w.runtime.diagnose(id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(exit.code, Some(3), "{exit:?}");
    assert_eq!(exit.reason, "exited with code 3");
    w.runtime.destroy(id).await.unwrap();

    // An entrypoint that does not exist: the guest says so.
    let mut bad = spec(&w, "ins_vm_bad").await;
    bad.image.entrypoint = vec!["/no/such/program".into()];
    bad.image.cmd.clear();
    w.runtime.start(&bad).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let InstanceState::Exited(e) = w.runtime.state("ins_vm_bad").await.unwrap() {
            break e;
        }
        assert!(Instant::now() < deadline, "the VM did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.reason.contains("cannot start") && exit.reason.contains("/no/such/program"), "{exit:?}");
    w.runtime.destroy("ins_vm_bad").await.unwrap();

    // A disk over the node's budget is refused before anything is created.
    let mut big = spec(&w, "ins_vm_big").await;
    let huge = w.dir.path().join("huge.img");
    std::fs::File::create(&huge).unwrap().set_len(2 << 30).unwrap();
    big.disk = Some(huge);
    let err = w.runtime.start(&big).await.unwrap_err().to_string();
    assert!(err.contains("disk budget"), "{err}");
    assert!(!w.dir.path().join("vms").join("ins_vm_big").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_that_cannot_boot_fails_with_the_console() {
    // A missing kernel is refused up front.
    let dir = tempfile::tempdir().unwrap();
    let logs = Arc::new(LogStore::new(&dir.path().join("logs")).unwrap());
    let mut o = options(dir.path(), "10.225.0.0");
    o.kernel = Some(dir.path().join("no-such-kernel"));
    let err = select(&o, logs.clone()).await.unwrap_err().to_string();
    assert!(err.contains("no-such-kernel") && err.contains("does not exist"), "{err}");
    // A file that is no kernel at all.
    let junk = dir.path().join("vmlinuz-junk");
    std::fs::write(&junk, b"not a kernel").unwrap();
    o.kernel = Some(junk);
    let err = select(&o, logs).await.unwrap_err().to_string();
    assert!(err.contains("not a bzImage"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_panics_at_boot_fails_with_its_console_and_leaves_nothing() {
    let w = world("exec /bin/busybox httpd -f -p $PORT -h /www", "10.229.0.0").await;
    // The real kernel with an initramfs whose /init cannot run: the kernel panics.
    let kernel = zeitwork_runtime::guest::find_kernel(None).unwrap();
    let good = zeitwork_runtime::guest::prepare(&w.dir.path().join("guest"), &kernel, None).unwrap();
    let broken = w.dir.path().join("broken.cpio");
    std::fs::write(&broken, zeitwork_runtime::guest::initramfs(b"#!/nonexistent\n", &[])).unwrap();
    let assets = zeitwork_runtime::guest::GuestAssets { initramfs: broken, ..good };
    let settings = zeitwork_runtime::vm::VmSettings {
        dir: w.dir.path().join("broken-vms"),
        vmm: zeitwork_runtime::vm::Vmm::Qemu {
            binary: "qemu-system-x86_64".into(),
            accel: zeitwork_runtime::vm::Accel::Tcg,
        },
        assets,
        base: "10.229.0.0".parse().unwrap(),
        disk_budget: 1 << 30,
        vmm_user: None,
        snapshots: w.dir.path().join("broken-snapshots"),
    };
    let rt = zeitwork_runtime::vm::VmRuntime::new(settings, w.logs.clone()).await.unwrap();
    let id = "ins_vm_panics";
    rt.start(&spec(&w, id).await).await.unwrap();
    let tap = std::fs::read_to_string(w.dir.path().join("broken-vms").join(id).join("tap")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let InstanceState::Exited(e) = rt.state(id).await.unwrap() {
            break e;
        }
        assert!(Instant::now() < deadline, "the VM did not end: {:?}", rt.diagnose(id).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(exit.code, None);
    assert!(exit.reason.contains("before the app reported an exit"), "{}", exit.reason);
    assert!(exit.reason.contains("Kernel panic") || exit.reason.contains("init"), "the console tail: {}", exit.reason);
    rt.destroy(id).await.unwrap();
    assert!(!link_exists(&tap));
    assert!(!w.dir.path().join("broken-vms").join(id).exists());
}

/// GETs `url` until it answers 200 (the VM may still be coming up), within two minutes.
async fn get_text(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match reqwest::get(url).await {
            Ok(r) if r.status().is_success() => return r.text().await.unwrap(),
            other if Instant::now() > deadline => panic!("{url} never answered: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A VM saved to a snapshot comes back with its memory: the app's boot id
/// and its counter in the tmpfs continue, on the same address; the snapshot's
/// slot is not handed to another VM meanwhile; a corrupt snapshot is refused
/// and leaves nothing behind. Prints boot and restore times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_the_running_vm_and_a_corrupt_one_is_refused() {
    let w = world(
        "cat /proc/sys/kernel/random/uuid > /www/boot; \
         (i=0; while true; do i=$((i+1)); echo $i > /www/count.new; mv /www/count.new /www/count; sleep 1; done) & \
         exec /bin/busybox httpd -f -p $PORT -h /www",
        "10.201.0.0",
    )
    .await;
    assert!(w.runtime.snapshots(), "QEMU takes snapshots");
    let snapshots = w.dir.path().join("snapshots");

    let booting = Instant::now();
    let a = w.runtime.start(&spec(&w, "ins_snap_a").await).await.unwrap();
    let boot_id = wait_for_http(&w, "ins_snap_a", &format!("http://{}/boot", a.address)).await;
    let boot = booting.elapsed();
    // The counter has moved past 1 before the snapshot.
    let before = loop {
        let n: u64 = get_text(&format!("http://{}/count", a.address)).await.trim().parse().unwrap();
        if n >= 2 {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let info = w.runtime.snapshot("ins_snap_a", "dep-snap").await.unwrap();
    assert!(info.bytes > 1 << 20, "{info:?}");
    assert!(snapshots.join("dep-snap").join("state").exists());
    assert!(snapshots.join("dep-snap").join("meta.json").exists());
    assert!(matches!(w.runtime.state("ins_snap_a").await.unwrap(), InstanceState::Exited(_)), "the VM ended");
    w.runtime.destroy("ins_snap_a").await.unwrap();
    assert_eq!(w.runtime.snapshot_keys(), vec!["dep-snap".to_owned()]);

    // Another VM started meanwhile gets another address: the snapshot keeps its own.
    let other = w.runtime.start(&spec(&w, "ins_snap_other").await).await.unwrap();
    assert_ne!(other.address, a.address, "the snapshot's slot stays reserved");
    w.runtime.destroy("ins_snap_other").await.unwrap();

    let restoring = Instant::now();
    let b = w.runtime.restore(&spec(&w, "ins_snap_b").await, "dep-snap").await.unwrap();
    assert_eq!(b.address, a.address, "the restored guest keeps its address");
    let same_boot = get_text(&format!("http://{}/boot", b.address)).await;
    let restore = restoring.elapsed();
    assert_eq!(same_boot, boot_id, "the app's memory came back, it did not boot again");
    assert!(w.runtime.snapshot_keys().is_empty() && !snapshots.join("dep-snap").exists(), "used up");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: u64 = get_text(&format!("http://{}/count", b.address)).await.trim().parse().unwrap();
        assert!(n >= before, "the counter continues from {before}, not from 1: {n}");
        if n > before {
            break;
        }
        assert!(Instant::now() < deadline, "the restored app's counter does not move");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "TCG boot to first byte: {} ms; restore to first byte: {} ms (state {} MiB, saved in {} ms)",
        boot.as_millis(),
        restore.as_millis(),
        info.bytes >> 20,
        info.took.as_millis()
    );

    // A snapshot whose state file was damaged on disk is refused before the guest runs.
    w.runtime.snapshot("ins_snap_b", "dep-snap").await.unwrap();
    w.runtime.destroy("ins_snap_b").await.unwrap();
    let state = snapshots.join("dep-snap").join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&state, bytes).unwrap();
    let err = w.runtime.restore(&spec(&w, "ins_snap_c").await, "dep-snap").await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(w.runtime.state("ins_snap_c").await.is_err(), "nothing of the failed restore is left");
    assert!(!w.dir.path().join("vms").join("ins_snap_c").exists());
    assert!(w.runtime.snapshot_keys().is_empty() && !snapshots.join("dep-snap").exists(), "the bad snapshot is gone");
}
