//! Build benchmark: the same build context built by Zeitwork (packed,
//! uploaded, queued, claimed by the node's builder, built with buildah in
//! its isolation, exported and stored as a deployable image) against buildah
//! run by hand on the host with the same isolation flags and the same cache
//! state, in the same run. Cold: an empty layer store on both sides (the
//! base image is pulled from a loopback registry each time). Warm: the same
//! context again on a store that has every layer.
//!
//! `cargo run --release -p zeitwork-bench-build -- [--cold 3] [--warm 5]`

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use zeitwork_bench_coldstart::{median, ms};
use zeitwork_bench_edge::flag;
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

const ID_BASE: &str = "1900000000";

/// A context with a base image from the registry, RUN steps that do some work, and COPY.
fn context(dir: &Path, base: &str) -> Result<()> {
    std::fs::create_dir_all(dir.join("src"))?;
    for i in 0..50 {
        std::fs::write(dir.join(format!("src/file{i}.txt")), format!("{i}\n").repeat(2000))?;
    }
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base} AS build\n\
             RUN /bin/busybox mkdir -p /out && /bin/busybox dd if=/dev/zero of=/out/blob bs=1M count=16 2>/dev/null\n\
             COPY src /out/src\n\
             RUN /bin/busybox sha256sum /out/src/* > /out/sums\n\
             FROM {base}\n\
             COPY --from=build /out /www\n\
             CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
        ),
    )?;
    Ok(())
}

fn pack(dir: &Path) -> Result<Vec<u8>> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", dir)?;
    Ok(tar.into_inner()?.finish()?)
}

/// buildah by hand, as the node's builder runs it: build, then export an oci-archive.
fn bare(root: &Path, ctx: &Path, out: &Path) -> Result<Duration> {
    let started = Instant::now();
    let map = format!("0:{ID_BASE}:65536");
    let run = |args: &[&str]| -> Result<()> {
        let o = Command::new("buildah")
            .arg("--root")
            .arg(root.join("storage"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .env("CONTAINERS_REGISTRIES_CONF", root.join("registries.conf"))
            .output()
            .context("running buildah")?;
        if !o.status.success() {
            bail!("buildah {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    };
    let ctx_s = ctx.display().to_string();
    let file = ctx.join("Dockerfile").display().to_string();
    run(&[
        "build",
        "--isolation",
        "oci",
        "--network",
        "none",
        "--userns-uid-map",
        &map,
        "--userns-gid-map",
        &map,
        "--layers=true",
        "--pull",
        "--file",
        &file,
        "--tag",
        "localhost/bench:1",
        &ctx_s,
    ])?;
    run(&["push", "--quiet", "localhost/bench:1", &format!("oci-archive:{}", out.display())])?;
    Ok(started.elapsed())
}

/// Zeitwork: upload, deploy with `build`, until the image is built and stored.
async fn zeitwork(admin: &Client, project: &str, packed: &[u8]) -> Result<Duration> {
    let started = Instant::now();
    let up: Value = admin.upload("/api/v1/orgs/acme/sources", "application/gzip", packed.to_vec().into()).await?;
    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": project, "build": {"source": up["source"]}, "instances_per_region": 1}),
        )
        .await?;
    let id = d["id"].as_str().context("no id")?.to_owned();
    loop {
        let b: Value = admin.get(&format!("/api/v1/deployments/{id}/build")).await?;
        match b["status"].as_str() {
            Some("succeeded") => return Ok(started.elapsed()),
            Some("failed") => bail!("the build failed: {}", b["error"]),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn project_body(name: &str) -> Value {
    json!({"name": name, "org": "acme", "resources": {"vcpu": 1, "memory": 1024}})
}

#[tokio::main]
async fn main() -> Result<()> {
    let cold_runs = flag("--cold", 3) as usize;
    let warm_runs = flag("--warm", 5) as usize;
    let reg = zeitwork_testkit::Registry::start()?;
    let base = reg.push_busybox("base", "1", "sleep 1000").await?;
    let dir = tempfile::tempdir()?;
    let ctx = dir.path().join("ctx");
    context(&ctx, &base)?;
    let packed = pack(&ctx)?;

    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("op"),
        apps_scheme: "http".into(),
        ..Default::default()
    })
    .await?;
    let base_url = format!("http://{}", op.addr());
    let admin = Client::new(&base_url, op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"})).await?;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await?;
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agent", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await?;
    // Instances of the built deployments are never started: each asks for more memory than the node offers.
    let agent = NodeAgent::start(NodeAgentConfig {
        listen: "127.0.0.1:0".parse()?,
        operator_url: base_url.clone(),
        token: t["secret"].as_str().map(str::to_owned),
        hostname: "bench-builder".into(),
        region: "local".into(),
        data_dir: dir.path().join("agent"),
        instance_range: "10.240.0.0".parse()?,
        runtime: "container".into(),
        memory: Some(128),
        ..Default::default()
    })
    .await?;
    let conf =
        "unqualified-search-registries = [\"docker.io\"]\n[[registry]]\nlocation = \"127.0.0.1\"\ninsecure = true\n";

    let mut cold = (Vec::new(), Vec::new());
    for i in 0..cold_runs {
        let project = format!("cold{i}");
        admin.post::<_, Value>("/api/v1/projects", &project_body(&project)).await?;
        cold.0.push(zeitwork(&admin, &project, &packed).await?);
        let root = dir.path().join(format!("bare-cold{i}"));
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("registries.conf"), conf)?;
        cold.1.push(bare(&root, &ctx, &root.join("image.tar"))?);
    }
    let mut warm = (Vec::new(), Vec::new());
    admin.post::<_, Value>("/api/v1/projects", &project_body("warm")).await?;
    zeitwork(&admin, "warm", &packed).await?;
    let root = dir.path().join("bare-warm");
    std::fs::create_dir_all(&root)?;
    std::fs::write(root.join("registries.conf"), conf)?;
    bare(&root, &ctx, &root.join("image.tar"))?;
    for _ in 0..warm_runs {
        warm.0.push(zeitwork(&admin, "warm", &packed).await?);
        warm.1.push(bare(&root, &ctx, &root.join("image.tar"))?);
    }
    println!("| build of the same context       | Zeitwork p50 | bare buildah p50 | ratio | n |");
    println!("|---------------------------------|--------------|------------------|-------|---|");
    for (name, (z, b)) in [("cold (empty layer store)", cold), ("warm (every layer cached)", warm)] {
        let n = z.len();
        let (z, b) = (median(z), median(b));
        println!(
            "| {name:<31} | {:>9.1} ms | {:>13.1} ms | {:.2}x | {n} |",
            ms(z),
            ms(b),
            z.as_secs_f64() / b.as_secs_f64()
        );
    }
    agent.shutdown().await;
    op.shutdown().await;
    Ok(())
}
