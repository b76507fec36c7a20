//! The Firecracker driver against Firecracker's documented API: every request
//! it sends is checked against the API's schema (tests/fixtures), served over
//! a real Unix socket by a checker that answers as Firecracker does (204, or
//! 400 with a `fault_message`). With `ZEITWORK_FIRECRACKER_BIN` pointing at a
//! firecracker binary (and working KVM), a real microVM is booted too.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use zeitwork_runtime::vm::{firecracker_put, firecracker_requests, kernel_args, Vmm};

fn schema() -> Value {
    serde_json::from_str(include_str!("fixtures/firecracker-api.json")).unwrap()
}

/// The schema's objection to `body` sent to `path`, if any.
fn check(schema: &Value, path: &str, body: &Value) -> Result<(), String> {
    let (template, id) = schema["paths"]
        .as_object()
        .unwrap()
        .keys()
        .find_map(|t| match t.split_once('{') {
            None => (t == path).then(|| (t.clone(), None)),
            Some((prefix, _)) => path
                .strip_prefix(prefix)
                .filter(|rest| !rest.is_empty() && !rest.contains('/'))
                .map(|rest| (t.clone(), Some(rest.to_owned()))),
        })
        .ok_or_else(|| format!("no such path {path}"))?;
    let def = &schema["definitions"][schema["paths"][&template].as_str().unwrap()];
    let body = body.as_object().ok_or("the body is not an object")?;
    for r in def["required"].as_array().unwrap() {
        let r = r.as_str().unwrap();
        if !body.contains_key(r) {
            return Err(format!("missing required property {r}"));
        }
    }
    for (k, v) in body {
        let prop = def["properties"].get(k).ok_or_else(|| format!("unknown property {k}"))?;
        let ok = match prop["type"].as_str().unwrap() {
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "boolean" => v.is_boolean(),
            "object" => v.is_object(),
            _ => false,
        };
        if !ok {
            return Err(format!("{k} is not a {}", prop["type"]));
        }
        if let Some(allowed) = prop["enum"].as_array() {
            if !allowed.contains(v) {
                return Err(format!("{k}: {v} is not one of {allowed:?}"));
            }
        }
        if let (Some(min), Some(n)) = (prop["minimum"].as_i64(), v.as_i64()) {
            if n < min {
                return Err(format!("{k}: {n} is below {min}"));
            }
        }
        if let (Some(max), Some(n)) = (prop["maximum"].as_i64(), v.as_i64()) {
            if n > max {
                return Err(format!("{k}: {n} is above {max}"));
            }
        }
    }
    if let (Some(field), Some(id)) = (def["path_id"].as_str(), id) {
        if body.get(field).and_then(Value::as_str) != Some(id.as_str()) {
            return Err(format!("{field} differs from the id in the path"));
        }
    }
    Ok(())
}

fn requests() -> Vec<(String, Value)> {
    let vmm = Vmm::Firecracker { binary: PathBuf::from("firecracker"), jailer: None };
    firecracker_requests(
        ("/guest/vmlinux", "/guest/initramfs.cpio"),
        &kernel_args(&vmm, false),
        2,
        256,
        &[("rootfs", "/images/app.ext4"), ("config", "/vms/ins_1/config.img")],
        Some(("zwt0a1b2c3d", "02:5a:57:00:00:01")),
    )
}

#[test]
fn every_request_matches_the_api_schema() {
    let schema = schema();
    let all = requests();
    assert_eq!(all.first().unwrap().0, "/machine-config");
    assert_eq!(all.last().unwrap(), &("/actions".to_owned(), json!({"action_type": "InstanceStart"})));
    for (path, body) in &all {
        check(&schema, path, body).unwrap_or_else(|e| panic!("PUT {path} {body}: {e}"));
    }
    // Firecracker boots the ELF kernel: the guest's console and reboot settings are on the command line.
    let boot = &all.iter().find(|(p, _)| p == "/boot-source").unwrap().1;
    let args = boot["boot_args"].as_str().unwrap();
    assert!(args.contains("console=ttyS0") && args.contains("reboot=k"), "{args}");
    // The stop request is a documented action too.
    check(&schema, "/actions", &json!({"action_type": "SendCtrlAltDel"})).unwrap();
    // The checker itself refuses what Firecracker refuses.
    assert!(check(&schema, "/boot-source", &json!({"boot_args": "x"})).unwrap_err().contains("kernel_image_path"));
    assert!(check(&schema, "/machine-config", &json!({"vcpu_count": 64, "mem_size_mib": 1})).is_err());
    assert!(check(&schema, "/drives/a", &json!({"drive_id": "b", "is_root_device": false})).is_err());
    assert!(check(&schema, "/actions", &json!({"action_type": "Reboot"})).is_err());
}

type Seen = Arc<Mutex<Vec<String>>>;

async fn api(
    State((schema, seen)): State<(Arc<Value>, Seen)>,
    UrlPath(path): UrlPath<String>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let path = format!("/{path}");
    match check(&schema, &path, &body) {
        Ok(()) => {
            seen.lock().unwrap().push(path);
            (StatusCode::NO_CONTENT, Json(Value::Null))
        }
        Err(e) => (StatusCode::BAD_REQUEST, Json(json!({"fault_message": e}))),
    }
}

#[tokio::test]
async fn the_client_speaks_http_over_the_api_socket_and_reports_faults() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let seen: Seen = Arc::default();
    let app =
        axum::Router::new().route("/{*path}", axum::routing::put(api)).with_state((Arc::new(schema()), seen.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    for (path, body) in requests() {
        firecracker_put(&socket, &path, &body).await.unwrap();
    }
    assert_eq!(seen.lock().unwrap().len(), requests().len());
    let err = firecracker_put(&socket, "/machine-config", &json!({"vcpu_count": 1})).await.unwrap_err();
    assert!(err.contains("400") && err.contains("mem_size_mib"), "{err}");
    let err = firecracker_put(Path::new("/nonexistent/api.sock"), "/actions", &json!({})).await.unwrap_err();
    assert!(err.contains("/nonexistent/api.sock"), "{err}");
}

/// A jail gets the shared kernel, initramfs and image without taking them
/// over: their owner and mode are unchanged after the jail is prepared and
/// removed, and the VM's own files are the jail user's copies.
#[test]
fn a_jail_never_takes_over_shared_files() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("vmlinux");
    std::fs::write(&shared, b"kernel").unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let private_shared = dir.path().join("disk.ext4");
    std::fs::write(&private_shared, b"image").unwrap();
    std::fs::set_permissions(&private_shared, std::fs::Permissions::from_mode(0o600)).unwrap();
    let own = dir.path().join("config.img");
    std::fs::write(&own, b"config").unwrap();
    let before: Vec<(u32, u32, u32)> = [&shared, &private_shared, &own]
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| (m.uid(), m.gid(), m.mode())).unwrap())
        .collect();
    let root = dir.path().join("jail/root");
    let files = [(&shared, true), (&private_shared, true), (&own, false)];
    zeitwork_runtime::vm::prepare_jail(&root, &files, 12345, 12345).unwrap();
    let meta = |p: &Path| std::fs::metadata(p).unwrap();
    // The world-readable shared file is linked, still root's; the others are the jail's copies.
    assert_eq!(meta(&root.join("f0")).ino(), meta(&shared).ino());
    assert_eq!(meta(&root.join("f0")).uid(), before[0].0);
    assert_ne!(meta(&root.join("f1")).ino(), meta(&private_shared).ino());
    assert_eq!(meta(&root.join("f1")).uid(), 12345);
    assert_eq!(meta(&root.join("f2")).uid(), 12345);
    assert_eq!(meta(&root.join("vmm.log")).uid(), 12345, "the VMM's own log");
    std::fs::remove_dir_all(dir.path().join("jail")).unwrap();
    let after: Vec<(u32, u32, u32)> = [&shared, &private_shared, &own]
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| (m.uid(), m.gid(), m.mode())).unwrap())
        .collect();
    assert_eq!(before, after, "no shared file changed owner or mode");
}

/// The probe recognises Firecracker's own words for a guest the host's KVM cannot run.
#[test]
fn firecrackers_kvm_crash_is_recognised() {
    assert!(zeitwork_runtime::vm::kvm_crashed(
        "[anonymous-instance:fc_vcpu 0] Received KVM_EXIT_INTERNAL_ERROR signal"
    ));
    assert!(zeitwork_runtime::vm::kvm_crashed("KVM internal error. Suberror: 1\nemulation failure"));
    assert!(!zeitwork_runtime::vm::kvm_crashed("Linux version 6.1.0"));
    // Firecracker adds pci=off itself; the driver does not send it again.
    let args = kernel_args(&Vmm::Firecracker { binary: "firecracker".into(), jailer: None }, false);
    assert!(!args.contains("pci=off"), "{args}");
}

/// The whole driver path against a real Firecracker: a VM from a registry
/// image with its drives and network, the API state `Running`, stop and
/// destroy, without and (with `ZEITWORK_JAILER_BIN`) with the jailer. On a
/// host whose KVM cannot run the guest the VM's failure must be that
/// recognised crash, not an API error; either way nothing is left behind and
/// the shared files keep their owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a firecracker binary: ZEITWORK_FIRECRACKER_BIN=… (and ZEITWORK_JAILER_BIN=… for the jailer) cargo test -p zeitwork-runtime --test firecracker -- --ignored"]
async fn a_real_firecracker_runs_the_whole_driver_path() {
    use std::os::unix::fs::MetadataExt;
    use zeitwork_runtime::{InstanceSpec, InstanceState, Runtime};
    let bin = PathBuf::from(std::env::var_os("ZEITWORK_FIRECRACKER_BIN").expect("set ZEITWORK_FIRECRACKER_BIN"));
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let reference =
        reg.push_busybox("test/fc", "v1", "echo up; exec /bin/busybox httpd -f -p $PORT -h /www").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let images = zeitwork_image::ImageStore::new(
        &dir.path().join("images"),
        zeitwork_image::RegistryConfig::default(),
        Default::default(),
    )
    .unwrap();
    let image = images.prepare(&reference).await.unwrap();
    let disk = images.ext4(&image).await.unwrap();
    let assets = zeitwork_runtime::guest::prepare(
        &dir.path().join("guest"),
        &zeitwork_runtime::guest::find_kernel(None).unwrap(),
        None,
    )
    .unwrap();
    let shared: Vec<PathBuf> = vec![assets.vmlinux.clone(), assets.initramfs.clone(), disk.clone()];
    let owners = |files: &[PathBuf]| -> Vec<(u32, u32, u32)> {
        files.iter().map(|f| std::fs::metadata(f).map(|m| (m.uid(), m.gid(), m.mode())).unwrap()).collect()
    };
    let before = owners(&shared);
    let mut jailers = vec![None];
    if let Some(j) = std::env::var_os("ZEITWORK_JAILER_BIN") {
        jailers.push(Some(zeitwork_runtime::vm::Jailer {
            binary: PathBuf::from(j),
            uid: 10000,
            gid: 10000,
            chroot_base: dir.path().join("jail"),
        }));
    }
    for (n, jailer) in jailers.into_iter().enumerate() {
        let logs = Arc::new(zeitwork_runtime::logs::LogStore::new(&dir.path().join(format!("logs{n}"))).unwrap());
        let settings = zeitwork_runtime::vm::VmSettings {
            dir: dir.path().join(format!("vms{n}")),
            vmm: Vmm::Firecracker { binary: bin.clone(), jailer: jailer.clone() },
            assets: assets.clone(),
            base: "10.229.0.0".parse().unwrap(),
            disk_budget: 1 << 30,
            vmm_user: None,
            snapshots: dir.path().join(format!("snapshots{n}")),
        };
        let runtime = zeitwork_runtime::vm::VmRuntime::new(settings, logs).await.unwrap();
        let id = format!("ins_fcpath{n}");
        let spec = InstanceSpec {
            id: id.clone(),
            rootfs: image.rootfs.clone(),
            image: image.config.clone(),
            env: Vec::new(),
            port: 8080,
            vcpu: 1,
            memory_mib: 128,
            disk: Some(disk.clone()),
            dns_search: None,
        };
        let running = runtime.start(&spec).await.expect("every API request is accepted");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let outcome = loop {
            if reqwest::get(format!("http://{}/", running.address)).await.is_ok_and(|r| r.status().is_success()) {
                break Ok(());
            }
            if let Ok(InstanceState::Exited(e)) = runtime.state(&id).await {
                break Err(format!("{} {}", e.reason, runtime.diagnose(&id).await.unwrap_or_default()));
            }
            assert!(std::time::Instant::now() < deadline, "the VM neither served nor ended");
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        };
        match outcome {
            Ok(()) => {
                runtime.stop(&id, std::time::Duration::from_secs(5)).await.unwrap();
            }
            // A host whose KVM cannot run stock guests: the recognised crash, a separate outcome.
            Err(why) => assert!(zeitwork_runtime::vm::kvm_crashed(&why), "not the recognised crash: {why}"),
        }
        runtime.destroy(&id).await.unwrap();
        if let Some(j) = &jailer {
            let jail = zeitwork_runtime::vm::jail_dir(j, &bin, &id);
            assert!(!jail.exists(), "{} is left behind", jail.display());
        }
        assert_eq!(owners(&shared), before, "a shared file changed owner or mode");
    }
}
