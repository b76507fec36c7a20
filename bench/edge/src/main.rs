//! `bench/edge`: the edge proxy against nginx as a reverse proxy to the same
//! upstream, in the same run on the same cores: `wrk` over HTTP/1.1, plain and
//! over TLS, and `h2load` over HTTPS/HTTP/2. Prints req/s, latency and the ratios.
//!
//! cargo run --release -p zeitwork-bench-edge -- [--seconds 10] [--connections 64]

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use zeitwork_bench_edge::*;
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_edge::{EdgeConfig, EdgeProxy};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (seconds, connections) = (flag("--seconds", 10), flag("--connections", 64));
    // Event loops for the edge and nginx alike (0 = one per core).
    let workers = flag("--workers", 0);
    let rounds = flag("--rounds", 3);
    let dir = tempfile::tempdir()?;
    let up = upstream().await?;

    // Operator with one deployment whose instance is the upstream.
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().join("op"),
        // The upstream stands in for a node agent and sends no heartbeats.
        node_timeout_secs: 3600,
        ..Default::default()
    })
    .await?;
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"})).await?;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await?;
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await?;
    let token = |role: &'static str| {
        let admin = admin.clone();
        async move {
            let t: Value = admin
                .post("/api/v1/tokens", &json!({"name": role, "scope": {"kind": "cluster", "role": role}}))
                .await?;
            anyhow::Ok(t["secret"].as_str().context("token secret")?.to_owned())
        }
    };
    let agent = Client::new(&format!("http://{}", op.addr()), Some(token("node-agent").await?));
    let node: Value = agent
        .post("/api/v1/nodes", &json!({"hostname": "bench", "region": "local", "address": format!("http://{up}"), "capacity": {"vcpu": 2, "memory": 2048}}))
        .await?;
    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "bench/web:1", "instances_per_region": 1}),
        )
        .await?;
    let dep = d["id"].as_str().context("deployment id")?.to_owned();
    // The engine places the deployment's instance on the stand-in node; it is
    // reported ready as its agent would.
    let mut placed = Vec::new();
    for _ in 0..3000 {
        placed = op.store.list_instances(&dep).await?;
        if !placed.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    if placed.is_empty() {
        let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await?;
        bail!("the engine did not place the deployment: {d}");
    }
    for inst in &placed {
        op.store.set_instance_status(&inst.id, zeitwork_api_types::InstanceStatus::Ready, None, None).await?;
    }
    let _ = node;
    let host = format!("{dep}.zeitwork.localhost");

    let cert = rcgen::generate_simple_self_signed(vec!["*.zeitwork.localhost".to_owned()])?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem())?;
    std::fs::write(&key_path, cert.signing_key.serialize_pem())?;

    let edge = EdgeProxy::start(EdgeConfig {
        http_listen: "127.0.0.1:0".parse()?,
        https_listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        operator_url: format!("http://{}", op.addr()),
        token: Some(token("edge-proxy").await?),
        tls_cert: Some(cert_path.clone()),
        tls_key: Some(key_path.clone()),
        rate_limit: zeitwork_api_types::RateLimit { requests_per_second: 1_000_000, burst: 1_000_000 },
        workers: workers as usize,
        ..Default::default()
    })
    .await?;
    for _ in 0..500 {
        if edge.state.routes.read().map(|r| r.hosts.contains_key(&host)).unwrap_or(false) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }

    // One request first: a benchmark of error pages would measure nothing.
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let probe = http.get(format!("http://{}/", edge.http_addr())).header("host", &host).send().await?;
        if !probe.status().is_success() {
            let status = probe.status();
            bail!("the edge does not reach the upstream ({status}): {}", probe.text().await.unwrap_or_default());
        }
    }

    // nginx does what the edge does per request: the same forwarding headers,
    // a request id to the app and back to the client.
    let (nh, ns) = (zeitwork_testkit::free_port(), zeitwork_testkit::free_port());
    let nginx_dir = dir.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let _nginx = nginx(
        &nginx_dir,
        workers,
        &format!(
            "upstream app {{ server {up}; keepalive 64; }}\n\
             server {{ listen 127.0.0.1:{nh}; keepalive_requests 1000000; location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Request-Id $request_id; add_header X-Request-Id $request_id; }} }}\n\
             server {{ listen 127.0.0.1:{ns} ssl http2; keepalive_requests 1000000; ssl_certificate {c}; ssl_certificate_key {k};\n\
               location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host $host; proxy_set_header X-Forwarded-For $remote_addr; proxy_set_header X-Forwarded-Proto $scheme; proxy_set_header X-Forwarded-Host $host; proxy_set_header X-Request-Id $request_id; add_header X-Request-Id $request_id; }} }}",
            c = cert_path.display(),
            k = key_path.display()
        ),
    )?;
    wait_port(SocketAddr::from(([127, 0, 0, 1], nh)), &nginx_dir)?;
    wait_port(SocketAddr::from(([127, 0, 0, 1], ns)), &nginx_dir)?;

    println!("wrk: HTTP/1.1 plain and over TLS, 2 threads, {connections} connections, {seconds} s each; h2load: HTTPS + HTTP/2, 16 connections x 16 streams");
    println!(
        "edge workers and nginx worker processes: {}\n",
        if workers == 0 { "one per core".to_owned() } else { workers.to_string() }
    );
    let run = |name: &str, port: u16| wrk(name, &format!("http://127.0.0.1:{port}/"), &host, seconds, connections);
    println!("HTTP/1.1, {rounds} alternating rounds (edge vs nginx), the median round of each kept:");
    let (n1, z1) =
        alternate(rounds, || run("nginx http/1.1", nh), || run("zeitwork edge http/1.1", edge.http_addr().port()))?;
    println!("HTTPS + HTTP/1.1, {rounds} alternating rounds (edge vs nginx), the median round of each kept:");
    let https = edge.https_addr().context("https")?.port();
    let tls = |name: &str, port: u16| wrk_tls(name, &host, port, seconds, connections, dir.path());
    let (n3, z3) = alternate(rounds, || tls("nginx https/1.1", ns), || tls("zeitwork edge https/1.1", https))?;
    println!();
    let n2 = h2load("nginx h2 (mean/max)", &host, SocketAddr::from(([127, 0, 0, 1], ns)), 100_000)?;
    let z2 = h2load("zeitwork edge h2 (mean/max)", &host, edge.https_addr().context("https")?, 100_000)?;
    for l in [&n1, &z1, &n3, &z3, &n2, &z2] {
        l.print();
    }
    println!();
    z1.ratio(&n1);
    z3.ratio(&n3);
    z2.ratio(&n2);
    if n2.errors > 0 {
        let log = std::fs::read_to_string(nginx_dir.join("error.log")).unwrap_or_default();
        println!("\nnginx's errors (last lines of its log):");
        for l in log.lines().rev().take(3) {
            println!("  {l}");
        }
    }
    edge.shutdown().await;
    op.shutdown().await;
    Ok(())
}
