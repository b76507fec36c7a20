//! The container driver with real parts: an image from a real registry,
//! runc, a network namespace and veth pair, cgroup limits.

use std::path::Path;
use std::time::{Duration, Instant};

use zeitwork_image::{ImageStore, Limits, RegistryConfig};
use zeitwork_runtime::container::ContainerRuntime;
use zeitwork_runtime::logs::LogStore;
use zeitwork_runtime::{InstanceSpec, InstanceState, Runtime};
use zeitwork_testkit::Registry;

async fn busybox_image(reg: &Registry, tag: &str, script: &str) -> String {
    reg.push_busybox("test/busybox", tag, script).await.unwrap()
}

fn logs(dir: &tempfile::TempDir) -> std::sync::Arc<LogStore> {
    std::sync::Arc::new(LogStore::new(&dir.path().join("logs")).unwrap())
}

fn spec(id: &str, rootfs: &Path, image: zeitwork_image::ImageConfig, port: u16) -> InstanceSpec {
    InstanceSpec {
        id: id.into(),
        rootfs: rootfs.to_owned(),
        image,
        env: vec![("GREETING".into(), "hi".into())],
        port,
        vcpu: 1,
        memory_mib: 128,
        disk: None,
        dns_search: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_an_image_with_its_own_network_limits_and_logs() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let runtime = ContainerRuntime::new(
        &dir.path().join("instances"),
        Path::new("runc"),
        "10.213.0.0".parse().unwrap(),
        logs(&dir),
    )
    .await
    .expect("runc is needed (apt-get install runc; .ci/run installs it)");

    // The app also tries what the seccomp filter and limits refuse: nested user
    // and network namespaces, mounts; and shows the host no paths in /proc/mounts.
    let web = images
        .prepare(
            &busybox_image(
                &reg,
                "web",
                "echo booting $GREETING; echo warn >&2; \
                 /bin/busybox unshare -U -r /bin/busybox true 2>/dev/null && echo userns-open || echo userns-closed; \
                 /bin/busybox unshare -n /bin/busybox true 2>/dev/null && echo netns-open || echo netns-closed; \
                 /bin/busybox mount -t tmpfs none /tmp 2>/dev/null && echo mount-open || echo mount-closed; \
                 (/bin/busybox sh -c 'echo forked') ; \
                 /bin/busybox sed 's/^/mount: /' /proc/mounts; \
                 exec /bin/busybox httpd -f -p $PORT -h /www",
            )
            .await,
        )
        .await
        .unwrap();
    let id = format!("ins_{:08x}", rand_u32());
    let running = runtime.start(&spec(&id, &web.rootfs, web.config.clone(), 8080)).await.unwrap();
    assert!(running.address.ip().to_string().starts_with("10.213."), "{}", running.address);

    // The app answers on its own address, reached over the veth pair.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        match reqwest::get(format!("http://{}/", running.address)).await {
            Ok(r) if r.status().is_success() => break r.text().await.unwrap(),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!(
                "the instance never answered: {other:?} {:?} {:?}",
                runtime.state(&id).await,
                runtime.logs(&id).await
            ),
        }
    };
    assert_eq!(body, "hello from a container\n");
    assert_eq!(runtime.state(&id).await.unwrap(), InstanceState::Running);

    // Memory limit from the project's resources.
    let limit = std::fs::read_to_string(format!("/sys/fs/cgroup/memory/zeitwork/zw-{id}/memory.limit_in_bytes"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/zeitwork/zw-{id}/memory.max")))
        .expect("a memory cgroup for the instance");
    assert_eq!(limit.trim(), (128u64 * 1024 * 1024).to_string());
    // Its use, from the same cgroups.
    let stats = runtime.stats(&id).await.unwrap();
    assert_eq!(stats.memory_limit_bytes, 128 * 1024 * 1024);
    assert!(stats.memory_bytes > 0 && stats.memory_bytes < stats.memory_limit_bytes, "{stats:?}");
    assert!(stats.processes >= 1, "{stats:?}");

    // At most PIDS_LIMIT processes.
    let pids = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/zeitwork/zw-{id}/pids.max"))
        .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/zeitwork/zw-{id}/pids.max")))
        .expect("a pids cgroup for the instance");
    assert_eq!(pids.trim(), zeitwork_runtime::container::PIDS_LIMIT.to_string());

    // Logs: both streams, timestamped, with the project's env in effect.
    let logs = runtime.logs(&id).await.unwrap();
    for refused in ["userns-closed", "netns-closed", "mount-closed", "forked"] {
        assert!(logs.iter().any(|l| l.line == refused), "{refused} missing: {logs:?}");
    }
    assert!(logs.iter().any(|l| l.stream == "stdout" && l.line == "booting hi"), "{logs:?}");
    let mounts: Vec<&str> = logs.iter().filter_map(|l| l.line.strip_prefix("mount: ")).collect();
    assert!(mounts.iter().any(|m| m.starts_with("overlay / overlay ")), "{mounts:?}");
    let host = dir.path().display().to_string();
    assert!(!mounts.iter().any(|m| m.contains(&host) || m.contains("/instances/")), "host paths shown: {mounts:?}");
    assert!(logs.iter().any(|l| l.stream == "stderr" && l.line == "warn"), "{logs:?}");

    // The image's root is never written: the instance writes to its overlay.
    let exit = runtime.stop(&id, Duration::from_secs(5)).await.unwrap();
    assert!(matches!(runtime.state(&id).await.unwrap(), InstanceState::Exited(_)), "{exit:?}");
    runtime.destroy(&id).await.unwrap();
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = zeitwork_runtime::container::netns_name(&id);
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&ns), "{ns} is gone");
    assert!(!dir.path().join("instances").join(&id).exists());
    assert!(web.rootfs.join("www/index.html").exists());
    // Logs outlive the instance, so a failed deployment can still be read.
    assert!(runtime.logs(&id).await.unwrap().iter().any(|l| l.line == "booting hi"));
    assert!(runtime.logs("ins_never_ran").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_are_reported() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let runtime = ContainerRuntime::new(
        &dir.path().join("instances"),
        Path::new("runc"),
        "10.214.0.0".parse().unwrap(),
        logs(&dir),
    )
    .await
    .unwrap();
    let img = images
        .prepare(&busybox_image(&reg, "crash", "echo $GREETING $PORT $FROM_IMAGE; touch /www/written; exit 3").await)
        .await
        .unwrap();
    let id = format!("ins_{:08x}", rand_u32());
    runtime.start(&spec(&id, &img.rootfs, img.config.clone(), 9090)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        match runtime.state(&id).await.unwrap() {
            InstanceState::Exited(e) => break e,
            InstanceState::Running if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            InstanceState::Running => panic!("the instance did not exit"),
        }
    };
    assert_eq!(exit.code, Some(3), "{exit:?} {:?}", runtime.logs(&id).await);
    assert_eq!(exit.reason, "exited with code 3");
    let logs = runtime.logs(&id).await.unwrap();
    assert!(logs.iter().any(|l| l.line == "hi 9090 1"), "{logs:?}");
    assert!(!img.rootfs.join("www/written").exists(), "writes go to the overlay, not the shared image");
    runtime.destroy(&id).await.unwrap();
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    t.subsec_nanos() ^ std::process::id().rotate_left(16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_runtime_cleans_up_after_a_crashed_one() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let img = images.prepare(&busybox_image(&reg, "sleepy", "exec /bin/busybox sleep 600").await).await.unwrap();
    let instances = dir.path().join("instances");
    let runtime =
        ContainerRuntime::new(&instances, Path::new("runc"), "10.218.0.0".parse().unwrap(), logs(&dir)).await.unwrap();
    let id = format!("ins_{:08x}", rand_u32());
    runtime.start(&spec(&id, &img.rootfs, img.config.clone(), 8080)).await.unwrap();
    // The agent dies without cleaning up.
    std::mem::forget(runtime);
    assert!(instances.join(&id).exists());
    let _again =
        ContainerRuntime::new(&instances, Path::new("runc"), "10.218.0.0".parse().unwrap(), logs(&dir)).await.unwrap();
    assert!(!instances.join(&id).exists(), "the leftover instance was removed");
    let netns = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&netns.stdout).contains(&zeitwork_runtime::container::netns_name(&id)));
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    assert!(!mounts.contains(&id), "its overlay is unmounted");
}

/// Loop devices whose backing file lies under `dir`.
fn loop_devices_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
            backing.starts_with(&dir).then(|| format!("{} ({})", e.file_name().to_string_lossy(), backing.trim()))
        })
        .collect()
}

async fn wait_for_line(runtime: &ContainerRuntime, id: &str, prefix: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = runtime.logs(id).await.unwrap();
        if let Some(l) = logs.iter().find(|l| l.line.starts_with(prefix)) {
            return l.line.clone();
        }
        assert!(Instant::now() < deadline, "no line {prefix:?}: {logs:?} {:?}", runtime.state(id).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_writable_layer_answers_enospc_and_leaves_the_host_disk_alone() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let instances = dir.path().join("instances");
    let confinement = zeitwork_runtime::container::Confinement { disk_mib: 32, userns_base: None };
    let runtime = ContainerRuntime::new(&instances, Path::new("runc"), "10.210.0.0".parse().unwrap(), logs(&dir))
        .await
        .unwrap()
        .confined(confinement);
    // 64 MiB into a 32 MiB layer: dd stops with ENOSPC, the app still serves.
    let img = images
        .prepare(
            &busybox_image(
                &reg,
                "filler",
                "/bin/busybox dd if=/dev/zero of=/tmp/fill bs=1M count=64 2>/tmp/dd.err; echo dd-exit=$?; \
                 echo dd-said=$(/bin/busybox cat /tmp/dd.err); \
                 echo df=$(/bin/busybox df -m / | /bin/busybox tail -n 1); \
                 exec /bin/busybox httpd -f -p $PORT -h /www",
            )
            .await,
        )
        .await
        .unwrap();
    let id = format!("ins_{:08x}", rand_u32());
    let free_before = free_bytes(dir.path());
    let running = runtime.start(&spec(&id, &img.rootfs, img.config.clone(), 8080)).await.unwrap();
    let exit = wait_for_line(&runtime, &id, "dd-exit=").await;
    assert_ne!(exit, "dd-exit=0", "writing past the quota fails");
    let said = wait_for_line(&runtime, &id, "dd-said=").await;
    assert!(said.contains("No space left on device"), "{said}");
    let df = wait_for_line(&runtime, &id, "df=").await;
    eprintln!("inside: {df}");

    // The layer is an ext4 image of the configured size on a loop device.
    let image = instances.join(&id).join("disk.img");
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 32 << 20);
    assert_eq!(loop_devices_under(&instances).len(), 1, "{:?}", loop_devices_under(&instances));
    // The host lost at most the layer's size (the image is sparse).
    use std::os::unix::fs::MetadataExt;
    let used = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(used <= 33 << 20, "the layer's image holds {used} bytes");
    let lost = free_before.saturating_sub(free_bytes(dir.path()));
    eprintln!("layer image uses {} MiB on the host; host free space went down by {} MiB", used >> 20, lost >> 20);
    assert!(!img.rootfs.join("tmp/fill").exists());

    let body = reqwest::get(format!("http://{}/", running.address)).await.unwrap().text().await.unwrap();
    assert_eq!(body, "hello from a container\n");

    runtime.destroy(&id).await.unwrap();
    assert!(loop_devices_under(&instances).is_empty(), "{:?}", loop_devices_under(&instances));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "nothing of the instance stays mounted");
    assert!(!instances.join(&id).exists());
}

fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df").args(["-B1", "--output=avail"]).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_image_runs_as_root_of_its_own_user_namespace() {
    let reg = Registry::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Traverse-only, as a node's data directory: the remapped root passes through to its bundle.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let images = ImageStore::new(&dir.path().join("images"), RegistryConfig::default(), Limits::default()).unwrap();
    let instances = dir.path().join("instances");
    let base = 1_500_000_000;
    let confinement = zeitwork_runtime::container::Confinement { disk_mib: 64, userns_base: Some(base) };
    let runtime = ContainerRuntime::new(&instances, Path::new("runc"), "10.209.0.0".parse().unwrap(), logs(&dir))
        .await
        .unwrap()
        .confined(confinement);
    let img = images
        .prepare(
            &busybox_image(
                &reg,
                "rooted",
                "echo uid=$(/bin/busybox id -u); echo map=$(/bin/busybox cat /proc/self/uid_map); \
                 echo made > /www/made && echo wrote-www; \
                 exec /bin/busybox httpd -f -p $PORT -h /www",
            )
            .await,
        )
        .await
        .unwrap();
    let id = format!("ins_{:08x}", rand_u32());
    let started = Instant::now();
    let running = runtime.start(&spec(&id, &img.rootfs, img.config.clone(), 8080)).await.unwrap();
    eprintln!("start with the remap took {:?}", started.elapsed());

    assert_eq!(wait_for_line(&runtime, &id, "uid=").await, "uid=0", "root inside");
    let map = wait_for_line(&runtime, &id, "map=").await;
    let fields: Vec<&str> = map["map=".len()..].split_whitespace().collect();
    let host: u32 = fields[1].parse().unwrap();
    assert_eq!((fields[0], fields[2]), ("0", "65536"), "{map}");
    assert!(host >= base && (host - base).is_multiple_of(65_536), "an instance range from the node's base: {map}");
    // Root of the image's own directories, so it writes where the image's root may.
    wait_for_line(&runtime, &id, "wrote-www").await;
    use std::os::unix::fs::MetadataExt;
    let made = std::fs::metadata(instances.join(&id).join("rootfs/www/made")).unwrap();
    assert_eq!(
        (made.uid(), made.gid()),
        (host, host),
        "a file the container's root made is the mapped uid's on the host"
    );
    // The shared image is untouched: still root's, nothing written into it.
    assert_eq!(std::fs::metadata(img.rootfs.join("www/index.html")).unwrap().uid(), 0);
    assert!(!img.rootfs.join("www/made").exists());

    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        match reqwest::get(format!("http://{}/made", running.address)).await {
            Ok(r) if r.status().is_success() => break r.text().await.unwrap(),
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("the instance never answered: {other:?} {:?}", runtime.logs(&id).await),
        }
    };
    assert_eq!(body, "made\n");
    runtime.destroy(&id).await.unwrap();
    assert!(!instances.join(&id).exists());
}
