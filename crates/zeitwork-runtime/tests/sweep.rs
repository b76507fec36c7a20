//! The sweeper with real loop devices: a container's writable layer left
//! attached by a killed agent is detached; a loop device of anything else
//! stays. Needs root and util-linux (losetup).

use std::path::Path;
use std::process::Command;

use zeitwork_runtime::sweep::{sweep, Scope};

fn attach(image: &Path) -> String {
    std::fs::File::create(image).unwrap().set_len(4 << 20).unwrap();
    let out = Command::new("losetup").args(["-f", "--show"]).arg(image).output().expect("losetup (util-linux)");
    assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn backing(device: &str) -> Option<String> {
    let name = device.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok().map(|b| b.trim().to_owned())
}

#[tokio::test]
async fn a_leftover_writable_layer_is_detached_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let instances = dir.path().join("instances");
    let leftover = instances.join("ins_left");
    std::fs::create_dir_all(&leftover).unwrap();
    let ours = attach(&leftover.join("disk.img"));
    let elsewhere = dir.path().join("elsewhere.img");
    let theirs = attach(&elsewhere);

    let removed = sweep(&Scope {
        dirs: vec![instances.clone()],
        base: "10.209.0.0".parse().unwrap(),
        oci_runtimes: vec![],
        known: Default::default(),
        grace: std::time::Duration::ZERO,
    })
    .await;

    let still_ours = backing(&ours);
    let still_theirs = backing(&theirs);
    // Tidy up before judging.
    let _ = Command::new("losetup").args(["-d", &ours]).output();
    let _ = Command::new("losetup").args(["-d", &theirs]).output();
    assert_eq!(still_ours, None, "the leftover layer's loop device is detached");
    assert!(removed.iter().any(|r| r.kind == "loop" && r.name.starts_with(&ours)), "{removed:?}");
    assert_eq!(still_theirs.as_deref(), Some(elsewhere.to_str().unwrap()), "another loop device stays");
    assert!(!leftover.exists(), "the leftover instance directory is removed");
}
