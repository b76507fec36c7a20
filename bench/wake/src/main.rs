//! Wake benchmark: a request for a sleeping deployment's URL, through the
//! edge, until the first HTTP 200 from the app: the edge holds the request,
//! asks the operator to wake the deployment, the engine places an instance,
//! the node agent starts it and reports it ready, the routing table brings
//! it to the edge, and the held request goes through. Operator, node agent
//! and edge run in this process with real parts (SQLite, a registry, runc or
//! QEMU); the image is cached on the node, as for any deployment that ran there.
//!
//! Next to it, in the same run, the floor: bare `runc run` of the same root
//! filesystem to its first 200 (no platform at all).
//!
//! With the same platform, `--deploy-runs` times (default 10): a deployment of
//! the cached image from the API call to `active`, and a rollback from the
//! API's answer to the edge routing the project's host to the old deployment.
//!
//! `cargo run --release -p zeitwork-bench-wake -- [--runs 20] [--vm-runs 3] [--deploy-runs 10]`

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeitwork_bench_coldstart::{bare_runc, median, ms, percentile};
use zeitwork_bench_edge::flag;
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

/// One request through the edge for `host`; its status code.
async fn get(edge: SocketAddr, host: &str) -> Result<u16> {
    let mut s = tokio::net::TcpStream::connect(edge).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(12)]).to_string();
    head.get(9..12).and_then(|c| c.parse().ok()).with_context(|| format!("not an HTTP answer: {head:?}"))
}

async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if f().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wakes to first byte on a platform whose agent uses `runtime`, `runs` times.
async fn wakes(
    runtime: &str,
    image: &str,
    runs: u32,
    range: &str,
    deploy_runs: u32,
    vm_snapshots: bool,
) -> Result<(Vec<Duration>, DeployTimes)> {
    let dir = tempfile::tempdir()?;
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("op"),
        apps_scheme: "http".into(),
        ..Default::default()
    })
    .await?;
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"})).await?;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "bench"})).await?;
    let project = json!({"name": "web", "org": "bench", "port": 8080, "instances_per_region": 1,
        "resources": {"vcpu": 1, "memory": 256}});
    admin.post::<_, Value>("/api/v1/projects", &project).await?;
    let token = |role: &'static str| {
        let admin = admin.clone();
        async move {
            let t: Value = admin
                .post("/api/v1/tokens", &json!({"name": role, "scope": {"kind": "cluster", "role": role}}))
                .await?;
            Ok::<_, anyhow::Error>(t["secret"].as_str().context("a token")?.to_owned())
        }
    };
    let agent = NodeAgent::start(NodeAgentConfig {
        listen: "127.0.0.1:0".parse()?,
        operator_url: base.clone(),
        token: Some(token("node-agent").await?),
        hostname: format!("bench-{runtime}"),
        region: "local".into(),
        data_dir: dir.path().join("agent"),
        instance_range: range.parse()?,
        runtime: runtime.into(),
        start_timeout_secs: 180,
        stop_grace_secs: 2,
        vm_snapshots,
        ..Default::default()
    })
    .await?;
    let edge = zeitwork_edge::EdgeProxy::start(zeitwork_edge::EdgeConfig {
        http_listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        operator_url: base.clone(),
        token: Some(token("edge-proxy").await?),
        wake_hold_secs: 240,
        ..Default::default()
    })
    .await?;
    let deploy = async |image: &str| -> Result<String> {
        let d: Value =
            admin.post("/api/v1/deployments", &json!({"org": "bench", "project": "web", "image": image})).await?;
        let id = d["id"].as_str().context("a deployment id")?.to_owned();
        until("the deployment to go live", Duration::from_secs(300), async || {
            let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await?;
            if d["status"] == "failed" {
                bail!("{id} failed: {}", d["reason"]);
            }
            Ok(d["status"] == "active")
        })
        .await?;
        Ok(id)
    };
    // The one that will sleep and wake, then another that takes production over.
    let sleeper = deploy(image).await?;
    deploy(image).await?;
    let host = format!("{sleeper}.zeitwork.localhost");
    let snapshot = dir.path().join("agent/snapshots").join(&sleeper).join("meta.json");
    let edge_addr = edge.http_addr();
    let mut out = Vec::new();
    for i in 0..runs {
        admin.post::<_, Value>(&format!("/api/v1/deployments/{sleeper}/sleep"), &json!({})).await?;
        // Asleep everywhere: no live instance, and the edge holds requests for it.
        until("the deployment to sleep", Duration::from_secs(60), async || {
            let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{sleeper}/instances")).await?;
            let stopped = is.iter().all(|i| i["status"] == "stopped");
            let table = edge.state.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
            let asleep = table.hosts.get(&host).is_some_and(|r| r.wake && r.instances.is_empty());
            // With snapshots, the VM's state is on disk before the wake.
            let saved = !vm_snapshots || runtime != "qemu" || snapshot.exists();
            Ok(stopped && asleep && saved)
        })
        .await?;
        // The agent has torn the old container down (an app that ignores SIGTERM takes the whole grace).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let t = Instant::now();
        let status = get(edge_addr, &host).await?;
        let took = t.elapsed();
        if status != 200 {
            bail!("wake {} answered {status}", i + 1);
        }
        println!("  {runtime} wake {:>2}: {:>7.1} ms", i + 1, ms(took));
        out.push(took);
        until("the wake to settle", Duration::from_secs(30), async || {
            let d: Value = admin.get(&format!("/api/v1/deployments/{sleeper}")).await?;
            Ok(d["status"] == "standby")
        })
        .await?;
    }
    let deploys = if runtime == "container" {
        deploy_and_roll_back(&admin, &edge, image, deploy_runs).await?
    } else {
        Default::default()
    };
    edge.shutdown().await;
    agent.shutdown().await;
    op.shutdown().await;
    Ok((out, deploys))
}

/// Times of deploys (API call to `active`) and rollbacks (API answer to the edge routing to the old deployment).
#[derive(Debug, Default)]
struct DeployTimes {
    deploys: Vec<Duration>,
    rollbacks: Vec<Duration>,
    rollback_answers: Vec<Duration>,
}

/// A deployment of the image already on the node, API call to `active`, and
/// a rollback to the one it replaced, API answer to the edge routing the
/// project's host to it; `runs` times each.
async fn deploy_and_roll_back(
    admin: &Client,
    edge: &zeitwork_edge::EdgeProxy,
    image: &str,
    runs: u32,
) -> Result<DeployTimes> {
    let host = "web-bench.zeitwork.localhost";
    let serving = || {
        let table = edge.state.routes.read().unwrap_or_else(|e| e.into_inner()).clone();
        table.hosts.get(host).map(|r| r.deployment.clone())
    };
    let mut out = DeployTimes::default();
    for i in 0..runs {
        let before = serving().context("the project's host is routed")?;
        let t = Instant::now();
        let d: Value =
            admin.post("/api/v1/deployments", &json!({"org": "bench", "project": "web", "image": image})).await?;
        let id = d["id"].as_str().context("a deployment id")?.to_owned();
        loop {
            let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await?;
            if d["status"] == "failed" {
                bail!("{id} failed: {}", d["reason"]);
            }
            if d["status"] == "active" {
                break;
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("{id} did not go live within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let deployed = t.elapsed();
        until("the edge to route the new deployment", Duration::from_secs(10), async || {
            Ok(serving().as_deref() == Some(id.as_str()))
        })
        .await?;
        let t = Instant::now();
        let _: Value = admin.post("/api/v1/projects/bench/web/rollback", &json!({"to": before})).await?;
        let answered = t.elapsed();
        while serving().as_deref() != Some(before.as_str()) {
            if t.elapsed() > Duration::from_secs(10) {
                bail!("the edge did not route {before} again within 10 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let visible = t.elapsed() - answered;
        println!(
            "  deploy {:>2}: {:>7.1} ms to active; rollback seen by the edge {:>6.1} ms after the API answered ({:.1} ms)",
            i + 1,
            ms(deployed),
            ms(visible),
            ms(answered)
        );
        out.deploys.push(deployed);
        out.rollbacks.push(visible);
        out.rollback_answers.push(answered);
    }
    Ok(out)
}

fn summary(name: &str, v: &[Duration]) {
    println!(
        "  {name:<34} p50 {:>7.1} ms   p99 {:>7.1} ms   (n = {})",
        ms(percentile(v.to_vec(), 50.0)),
        ms(percentile(v.to_vec(), 99.0)),
        v.len()
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        zeitwork_telemetry::init_logging(&filter, zeitwork_telemetry::LogFormat::Text);
    }
    let runs = flag("--runs", 20).max(1);
    let vm_runs = flag("--vm-runs", 3);
    let deploy_runs = flag("--deploy-runs", 10);
    let reg = zeitwork_testkit::Registry::start()?;
    let image = reg.push_busybox("bench/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await?;

    let (containers, deploys) = wakes("container", &image, runs, "10.232.0.0", deploy_runs, false).await?;

    // The floor, same run: bare runc of the same root filesystem to its first 200.
    let dir = tempfile::tempdir()?;
    let images = zeitwork_image::ImageStore::new(
        &dir.path().join("images"),
        zeitwork_image::RegistryConfig::default(),
        Default::default(),
    )?;
    let img = images.prepare(&image).await?;
    let mut floor = Vec::new();
    for i in 0..runs.min(10) {
        floor
            .push(bare_runc(&img.rootfs, 19_080 + i as u16, Path::new(dir.path()), &format!("zwwake-bare-{i}")).await?);
    }

    // MicroVMs twice in the same run: every wake a boot, then every wake a snapshot restore.
    let (vms, restores) = if vm_runs > 0 {
        let boots = wakes("qemu", &image, vm_runs, "10.233.0.0", 0, false).await.map(|w| w.0);
        let restores = wakes("qemu", &image, vm_runs, "10.233.0.0", 0, true).await.map(|w| w.0);
        (Some(boots), Some(restores))
    } else {
        (None, None)
    };

    println!();
    println!("wake to first HTTP 200 through the edge (sleeping deployment, cached image):");
    summary("zeitwork, container runtime", &containers);
    summary("bare runc start (floor)", &floor);
    println!(
        "  ratio (zeitwork p50 / floor p50):    {:>7.2}x   (goal: container wake p50 < 300 ms)",
        median(containers.clone()).as_secs_f64() / median(floor.clone()).as_secs_f64()
    );
    match &vms {
        Some(Ok(v)) => summary("zeitwork, qemu microVM (boot)", v),
        Some(Err(e)) => println!("  qemu microVM: not measured here ({e:#})"),
        None => println!("  qemu microVM: skipped (--vm-runs 0)"),
    }
    match (&restores, &vms) {
        (Some(Ok(r)), Some(Ok(b))) => {
            summary("zeitwork, qemu microVM (snapshot)", r);
            println!(
                "  ratio (snapshot p50 / boot p50):     {:>7.2}x   (goal: < 0.5x under TCG)",
                median(r.clone()).as_secs_f64() / median(b.clone()).as_secs_f64()
            );
        }
        (Some(Ok(r)), _) => summary("zeitwork, qemu microVM (snapshot)", r),
        (Some(Err(e)), _) => println!("  qemu microVM from a snapshot: not measured here ({e:#})"),
        (None, _) => {}
    }
    if !deploys.deploys.is_empty() {
        println!();
        println!("deploy and rollback through the platform (container runtime, image cached on the node):");
        summary("deploy: API call to active", &deploys.deploys);
        summary("rollback: API answer to edge", &deploys.rollbacks);
        summary("rollback: API call answered", &deploys.rollback_answers);
        println!("  goals: deploy < 500 ms, rollback visible at the edge < 100 ms after the API answers");
    }
    println!("  reference points: Knative cold start ~2-4 s (its docs), Fly Machines start ~300 ms (Fly's docs)");
    Ok(())
}
