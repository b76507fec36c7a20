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
