//! Builds Zeitwork's guest init as a static binary and hands it to the crate
//! (embedded in every binary that can start microVMs). It runs a second cargo
//! on the workspace's `zeitwork-guest-init` package, with its own target
//! directory, because a static C runtime is a per-binary link choice cargo
//! has no package-level setting for. `ZEITWORK_GUEST_INIT` names a prebuilt
//! one instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dest = out.join("zeitwork-guest-init");
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let init = manifest_dir.join("../zeitwork-guest-init");
    println!("cargo:rerun-if-env-changed=ZEITWORK_GUEST_INIT");
    println!("cargo:rerun-if-changed={}", init.join("src").display());
    println!("cargo:rerun-if-changed={}", init.join("Cargo.toml").display());
    if let Some(prebuilt) = std::env::var_os("ZEITWORK_GUEST_INIT") {
        std::fs::copy(&prebuilt, &dest).expect("copying ZEITWORK_GUEST_INIT");
        return;
    }
    let target = std::env::var("TARGET").expect("TARGET");
    // <target dir>/<profile>/build/<package>/out → <target dir>/guest-init
    let target_dir = out.ancestors().nth(4).map(|d| d.join("guest-init")).unwrap_or_else(|| out.join("guest-init"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["rustc", "--quiet", "--release", "-p", "zeitwork-guest-init", "--bin", "zeitwork-guest-init"])
        .arg("--manifest-path")
        .arg(init.join("Cargo.toml"))
        .arg("--target")
        .arg(&target)
        .arg("--target-dir")
        .arg(&target_dir)
        .args(["--", "-C", "target-feature=+crt-static", "-C", "strip=symbols"]);
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the guest init");
    assert!(status.success(), "building the static guest init failed (see above)");
    let built = target_dir.join(&target).join("release").join("zeitwork-guest-init");
    std::fs::copy(&built, &dest).expect("copying the guest init");
}
