//! `bench/l4`: the load balancer against HAProxy in TCP mode, both sending
//! PROXY v2 to the same nginx backend, measured with `wrk` in the same run:
//! small responses (requests per second), then 1 MiB responses (bulk bytes,
//! where the balancer splices).
//!
//! cargo run --release -p zeitwork-bench-l4 -- [--seconds 10] [--connections 64]

use std::net::SocketAddr;

use anyhow::Result;
use zeitwork_bench_edge::*;
use zeitwork_lb::{Algorithm, LbConfig, ListenerConfig, LoadBalancer};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let (seconds, connections) = (flag("--seconds", 10), flag("--connections", 64));
    let rounds = flag("--rounds", 3);
    // Threads for the load balancer and HAProxy alike (0 = one per core).
    let workers = match flag("--workers", 0) {
        0 => std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1),
        n => n,
    };
    let dir = tempfile::tempdir()?;
    let (backend, hp) = (zeitwork_testkit::free_port(), zeitwork_testkit::free_port());
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("big"), vec![b'z'; 1 << 20])?;
    let _nginx = nginx(
        dir.path(),
        1,
        &format!(
            "server {{ listen 127.0.0.1:{backend} proxy_protocol; location / {{ return 200 'hello, world\\n'; }} \
             location = /big {{ root {}; }} }}",
            www.display()
        ),
    )?;
    wait_port(SocketAddr::from(([127, 0, 0, 1], backend)), dir.path())?;
    let _haproxy = haproxy(
        dir.path(),
        &format!(
            "global\n  maxconn 4000\n  nbthread {workers}\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
             frontend f\n  bind 127.0.0.1:{hp}\n  default_backend b\nbackend b\n  balance leastconn\n  server s1 127.0.0.1:{backend} send-proxy-v2\n"
        ),
    )?;
    wait_port(SocketAddr::from(([127, 0, 0, 1], hp)), dir.path())?;
    let lb = LoadBalancer::start(LbConfig {
        listeners: vec![ListenerConfig {
            listen: "127.0.0.1:0".parse()?,
            backends: vec![SocketAddr::from(([127, 0, 0, 1], backend))],
            backends_from: None,
            algorithm: Algorithm::LeastConnections,
            proxy_protocol: true,
        }],
        admin_listen: "127.0.0.1:0".parse()?,
        workers: workers as usize,
        ..Default::default()
    })
    .await?;
    println!("wrk through each L4 balancer ({workers} threads each) to nginx (PROXY v2), 2 threads, {connections} connections, {seconds} s\n");
    println!("{rounds} alternating rounds, the median round of each kept:");
    let (h, z) = alternate(
        rounds,
        || wrk("haproxy tcp", &format!("http://127.0.0.1:{hp}/"), "l4", seconds, connections),
        || wrk("zeitwork load-balancer", &format!("http://{}/", lb.addrs()[0]), "l4", seconds, connections),
    )?;
    println!();
    h.print();
    z.print();
    println!();
    z.ratio(&h);
    println!("\n1 MiB responses, 16 connections (bulk: requests/s x 1 MiB = bytes moved)\n");
    let hb = wrk("haproxy tcp, 1 MiB", &format!("http://127.0.0.1:{hp}/big"), "l4", seconds, 16)?;
    let zb = wrk("zeitwork lb, 1 MiB", &format!("http://{}/big", lb.addrs()[0]), "l4", seconds, 16)?;
    hb.print();
    zb.print();
    println!();
    zb.ratio(&hb);
    lb.shutdown().await;
    Ok(())
}
