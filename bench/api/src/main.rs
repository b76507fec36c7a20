//! `bench/api`: an open-loop load of GET and POST calls at a fixed rate against
//! the operator on SQLite and on PostgreSQL, with nginx answering a static JSON
//! body at the same rate as the peer. Prints throughput and p50/p99 per
//! backend and the ratio to nginx.
//!
//! cargo run --release -p zeitwork-bench-api -- [--rate 200] [--seconds 10]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::sync::Mutex;
use zeitwork_bench_edge::flag;
use zeitwork_control_plane::{Operator, OperatorConfig};

#[derive(Clone, Copy)]
struct Load {
    rate: u32,
    seconds: u32,
}

struct Report {
    name: String,
    sent: usize,
    errors: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl Report {
    fn print(&self) {
        println!(
            "{:<12} {:>8.1} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            self.name,
            self.sent as f64 / self.elapsed.as_secs_f64(),
            ms(self.p50),
            ms(self.p99),
            self.errors
        );
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One request of the mix, chosen by sequence number.
type MakeRequest = Arc<dyn Fn(&reqwest::Client, u64) -> reqwest::RequestBuilder + Send + Sync>;

/// Sends `rate` requests per second for `seconds`, each at its scheduled time;
/// latency counts from the scheduled time, so a stall is not hidden.
async fn run(name: &str, load: Load, make: MakeRequest) -> Report {
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let total = (load.rate * load.seconds) as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(load.rate));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(total as usize)));
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let req = make(&client, i);
        let latencies = latencies.clone();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let ok = match req.send().await {
                Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                Err(_) => false,
            };
            if !ok {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            latencies.lock().await.push(due.elapsed());
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = start.elapsed();
    let mut l = latencies.lock().await.clone();
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 * p) as usize).min(l.len() - 1)];
    Report {
        name: name.into(),
        sent: l.len(),
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

async fn operator_mix(name: &str, database_url: Option<String>, load: Load) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_owned(),
        database_url,
        ..Default::default()
    })
    .await?;
    let base = format!("http://{}", op.addr());
    let token = op.admin_token.clone().context("fresh store has an admin token")?;
    let c = reqwest::Client::new();
    for (path, body) in [
        ("/api/v1/regions", json!({"code": "us-east", "name": "US East", "country": "US"})),
        ("/api/v1/orgs", json!({"slug": "acme"})),
        ("/api/v1/projects", json!({"name": "web", "org": "acme"})),
    ] {
        let r = c.post(format!("{base}{path}")).bearer_auth(&token).json(&body).send().await?;
        if !r.status().is_success() {
            bail!("setup {path}: {}", r.status());
        }
    }
    let make: MakeRequest = Arc::new(move |c, i| match i % 5 {
        0 => c
            .post(format!("{base}/api/v1/deployments"))
            .bearer_auth(&token)
            .json(&json!({"org": "acme", "project": "web", "image": "ghcr.io/acme/web:1"})),
        1 => c.get(format!("{base}/api/v1/deployments?limit=20")).bearer_auth(&token),
        _ => c.get(format!("{base}/api/v1/projects/acme/web")).bearer_auth(&token),
    });
    let report = run(name, load, make).await;
    op.shutdown().await;
    Ok(report)
}

/// nginx returning a small JSON body: the floor of HTTP on this machine.
async fn nginx_peer(load: Load) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let port = zeitwork_testkit::free_port();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; daemon off; pid {p}/nginx.pid; error_log {p}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; server {{ listen 127.0.0.1:{port}; \
             location / {{ default_type application/json; return 200 '{{\"ok\":true}}'; }} }} }}\n",
            p = dir.path().display()
        ),
    )?;
    let mut child = Command::new("nginx")
        .args(["-c", &conf.display().to_string(), "-p", &dir.path().display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("nginx is not installed (apt-get install nginx)")?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://127.0.0.1:{port}/");
    let report = run("nginx", load, Arc::new(move |c, _| c.get(&url))).await;
    let _ = child.kill();
    let _ = child.wait();
    Ok(report)
}

#[tokio::main]
async fn main() -> Result<()> {
    let load = Load { rate: flag("--rate", 200), seconds: flag("--seconds", 10) };
    println!(
        "open-loop load: {} req/s for {} s per target (60% GET project, 20% GET deployments, 20% POST deployment)",
        load.rate, load.seconds
    );

    let peer = nginx_peer(load).await;
    let sqlite = operator_mix("sqlite", None, load).await?;
    let pg = zeitwork_testkit::Postgres::start()?;
    let url = pg.create_database("bench")?;
    let postgres = operator_mix("postgres", Some(url), load).await?;

    println!();
    let peer = match peer {
        Ok(p) => {
            p.print();
            Some(p)
        }
        Err(e) => {
            println!("nginx        skipped: {e:#}");
            None
        }
    };
    for r in [&sqlite, &postgres] {
        r.print();
    }
    println!();
    for r in [&sqlite, &postgres] {
        let verdict = if r.p99 < Duration::from_millis(20) && r.errors == 0 { "meets" } else { "MISSES" };
        let ratio = peer
            .as_ref()
            .map(|p| format!(", {:.1}x nginx's p99", ms(r.p99) / ms(p.p99).max(0.001)))
            .unwrap_or_default();
        println!("{:<9} {verdict} the target (p99 < 20 ms at {} req/s){ratio}", r.name, load.rate);
    }
    Ok(())
}
