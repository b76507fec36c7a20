//! Image pipeline benchmark: pull + unpack + ext4 of a ~100 MB multi-layer
//! image from a local registry (Debian's docker-registry), Zeitwork's image
//! store against `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d` in the same
//! run, each from an empty cache. Prints the medians and the ratio.
//!
//! `cargo run --release -p zeitwork-bench-image -- [--mb 100] [--layers 5] [--runs 3]`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use zeitwork_bench_edge::flag;
use zeitwork_image::{ImageStore, Limits, RegistryConfig};
use zeitwork_testkit::{layer_tar, Registry};

/// Deterministic bytes: half incompressible noise, half text, like real layers.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if (out.len() / 4096) % 2 == 0 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.extend_from_slice(&x.to_le_bytes());
        } else {
            out.extend_from_slice(b"lorem ipsum dolor sit amet, consectetur adipiscing elit\n");
        }
    }
    out.truncate(len);
    out
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn du(path: &std::path::Path) -> u64 {
    let out = Command::new("du").args(["-sb"]).arg(path).output().ok();
    out.and_then(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let mb = flag("--mb", 100) as usize;
    let layers_n = flag("--layers", 5).max(1) as usize;
    let runs = flag("--runs", 3).max(1);
    for tool in ["skopeo", "umoci", "mkfs.ext4"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} is needed for the comparison (apt-get install -y skopeo umoci e2fsprogs)");
        }
    }
    let reg = Registry::start()?;
    println!("building a {mb} MB image of {layers_n} layers…");
    let per_layer = mb * 1024 * 1024 / layers_n;
    let mut layers = Vec::new();
    for l in 0..layers_n {
        let files: Vec<(String, Vec<u8>)> =
            (0..16).map(|f| (format!("data/l{l}/f{f}.bin"), content((l * 100 + f) as u64, per_layer / 16))).collect();
        let mut entries: Vec<(&str, &[u8])> = vec![("data/", b""), ("bin/", b"")];
        let dir = format!("data/l{l}/");
        entries.push((&dir, b""));
        entries.extend(files.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        layers.push(layer_tar(&entries));
    }
    let config = serde_json::json!({"Cmd": ["/bin/true"], "Env": ["PATH=/bin"]});
    reg.push_image("bench/big", "v1", &layers, config).await?;
    let reference = format!("{}/bench/big:v1", reg.addr);

    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for i in 0..runs {
        // Zeitwork: pull, unpack, ext4.
        let dir = tempfile::tempdir()?;
        let store = ImageStore::new(dir.path(), RegistryConfig::default(), Limits::default())?;
        let t = Instant::now();
        let img = store.prepare(&reference).await?;
        let ext4 = store.ext4(&img).await?;
        let took = t.elapsed();
        if i == 0 {
            println!(
                "  zeitwork: rootfs {} MB, ext4 {} MB",
                du(&img.rootfs) / 1_000_000,
                std::fs::metadata(&ext4)?.len() / 1_000_000
            );
        }
        ours.push(took);
        drop(store);
        drop(dir);

        // The pair: skopeo copy to an OCI layout, umoci unpack, mkfs.ext4 -d.
        let dir = tempfile::tempdir()?;
        let layout = dir.path().join("oci");
        let bundle = dir.path().join("bundle");
        let img = dir.path().join("rootfs.img");
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false", &format!("docker://{reference}")])
            .arg(format!("oci:{}:v1", layout.display())))?;
        run(Command::new("umoci")
            .args(["unpack", "--rootless", "--image"])
            .arg(format!("{}:v1", layout.display()))
            .arg(&bundle))?;
        let size_mb = du(&bundle.join("rootfs")) / (1024 * 1024) * 5 / 4 + 64;
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(bundle.join("rootfs"))
            .arg(&img)
            .arg(format!("{size_mb}M")))?;
        peer.push(t.elapsed());
        println!(
            "  run {}: zeitwork {:.2} s, skopeo+umoci+mkfs {:.2} s",
            i + 1,
            ours[i as usize].as_secs_f64(),
            t.elapsed().as_secs_f64()
        );
    }
    let (o, p) = (median(ours), median(peer));
    println!();
    println!("image pipeline, {mb} MB in {layers_n} gzip layers, median of {runs}, from an empty cache:");
    println!("  zeitwork (pull + unpack + ext4):           {:>7.2} s", o.as_secs_f64());
    println!("  skopeo copy + umoci unpack + mkfs.ext4 -d: {:>7.2} s", p.as_secs_f64());
    println!("  ratio (peer time / zeitwork time):         {:>7.2}x  (goal: > 1.0)", p.as_secs_f64() / o.as_secs_f64());
    Ok(())
}
