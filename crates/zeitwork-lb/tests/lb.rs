//! The load balancer over real TCP: spreading, PROXY v2, health checks, drain.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use zeitwork_lb::{Algorithm, LbConfig, ListenerConfig, LoadBalancer};

/// A backend that reads the PROXY header, says who it is and whom it sees, then echoes.
async fn backend_on(listener: TcpListener, name: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let name = name.clone();
            tokio::spawn(async move {
                // Health checks connect and close without a header.
                let Ok(src) = zeitwork_net::read_v2(&mut s).await else { return };
                let hello = format!("{name} {}\n", src.map(|a| a.ip().to_string()).unwrap_or_default());
                if s.write_all(hello.as_bytes()).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

async fn backend(name: &str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (addr, backend_on(l, name.to_owned()).await)
}

async fn lb(backends: Vec<SocketAddr>, algorithm: Algorithm) -> LoadBalancer {
    LoadBalancer::start(LbConfig {
        listeners: vec![ListenerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            backends,
            backends_from: None,
            algorithm,
            proxy_protocol: true,
        }],
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        health_interval_ms: 100,
        health_timeout_ms: 100,
        drain_timeout_secs: 5,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// Connects from `src` (a 127.0.0.x address) and returns the backend's greeting.
async fn hello(lb: SocketAddr, src: &str) -> (String, TcpStream) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    let mut s = sock.connect(lb).await.unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await.unwrap().is_ok() && b[0] != b'\n' {
        line.push(b[0]);
    }
    (String::from_utf8(line).unwrap(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_with_the_client_address_in_proxy_v2() {
    let (a, _) = backend("a").await;
    let (b, _) = backend("b").await;
    let (c, _) = backend("c").await;
    let lb = lb(vec![a, b, c], Algorithm::RoundRobin).await;
    let mut counts = std::collections::HashMap::new();
    for i in 0..30 {
        let src = format!("127.0.0.{}", 2 + i % 5);
        let (greeting, mut s) = hello(lb.addrs()[0], &src).await;
        let (name, seen) = greeting.split_once(' ').unwrap();
        assert_eq!(seen, src, "the backend sees the client's address");
        *counts.entry(name.to_owned()).or_insert(0) += 1;
        s.write_all(b"echo").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"echo");
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![10, 10, 10], "{counts:?}");
    let m = reqwest_get(lb.admin_addr(), "/metrics").await;
    assert!(m.lines().any(|l| l.starts_with("zeitwork_lb_connections_total")), "one prefix: {m}");
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_hash_keeps_a_client_on_one_backend() {
    let (a, _) = backend("a").await;
    let (b, _) = backend("b").await;
    let lb = lb(vec![a, b], Algorithm::IpHash).await;
    for src in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let first = hello(lb.addrs()[0], src).await.0;
        for _ in 0..5 {
            assert_eq!(hello(lb.addrs()[0], src).await.0, first);
        }
    }
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_take_a_dead_backend_out_and_back() {
    let (a, _) = backend("a").await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    let b_task = backend_on(l, "b".into()).await;
    let lb = lb(vec![a, b], Algorithm::RoundRobin).await;
    b_task.abort();
    let _ = b_task.await;
    // Two failed checks at 100 ms: out within a second.
    let mut out = false;
    for _ in 0..50 {
        if !lb.pools[0].backends()[1].is_healthy() {
            out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(out, "the dead backend was not taken out");
    for _ in 0..6 {
        assert!(hello(lb.addrs()[0], "127.0.0.2").await.0.starts_with("a "));
    }
    // It comes back on the same address.
    let _b = backend_on(TcpListener::bind(b).await.unwrap(), "b".into()).await;
    let mut back = false;
    for _ in 0..50 {
        if lb.pools[0].backends()[1].is_healthy() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the backend was not put back");
    let names: std::collections::HashSet<String> =
        futures_lite(6, || hello(lb.addrs()[0], "127.0.0.2")).await.into_iter().map(|g| g[..1].to_owned()).collect();
    assert_eq!(names.len(), 2);
    lb.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_drains_open_connections() {
    let (a, _) = backend("a").await;
    let lb = lb(vec![a], Algorithm::LeastConnections).await;
    let addr = lb.addrs()[0];
    let (_, mut open) = hello(addr, "127.0.0.2").await;
    let stopping = tokio::spawn(lb.shutdown());
    // New connections are refused once the listener closes; the open one still works.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "the load balancer kept accepting while stopping");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    open.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    open.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    drop(open);
    tokio::time::timeout(Duration::from_secs(5), stopping).await.unwrap().unwrap();
}

async fn futures_lite<F, Fut>(n: usize, f: F) -> Vec<String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = (String, TcpStream)>,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(f().await.0);
    }
    out
}

async fn reqwest_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
