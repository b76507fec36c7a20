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

/// A real Firecracker, when one is configured: boot a VM and stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_firecracker_boots_a_guest() {
    let Some(bin) = std::env::var_os("ZEITWORK_FIRECRACKER_BIN") else {
        eprintln!("skipped: set ZEITWORK_FIRECRACKER_BIN to a firecracker binary (it needs working KVM) to run this");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let logs = Arc::new(zeitwork_runtime::logs::LogStore::new(&dir.path().join("logs")).unwrap());
    let o = zeitwork_runtime::select::SelectOptions {
        requested: "firecracker".into(),
        dir: dir.path().to_owned(),
        oci_runtime: "runc".into(),
        qemu: "qemu-system-x86_64".into(),
        firecracker: Some(PathBuf::from(bin)),
        jailer: None,
        kernel: None,
        base: "10.228.0.0".parse().unwrap(),
        disk_budget: 1 << 30,
    };
    let selected = zeitwork_runtime::select::select(&o, logs).await.expect("firecracker with working KVM");
    assert_eq!(selected.name, "firecracker");
}
