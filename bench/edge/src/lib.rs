//! Helpers shared by the proxy benchmarks: a small upstream, peers (nginx,
//! HAProxy) in temp dirs, and running/parsing `wrk` and `h2load`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;

/// The number after `--name` on the command line, or `default`.
pub fn flag(name: &str, default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// An HTTP/1.1 upstream answering every request with a 13-byte body.
pub async fn upstream() -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"hello, world\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc).await;
            });
        }
    });
    Ok(addr)
}

/// A peer process, stopped on drop: asked first (SIGTERM, so nginx's master
/// stops its workers too), killed if it is still there after two seconds.
pub struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let asked = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        if asked.is_ok_and(|s| s.success()) {
            for _ in 0..40 {
                if matches!(self.0.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Err(e) = self.0.kill() {
            eprintln!("peer (pid {}) was not stopped: {e}", self.0.id());
        }
        let _ = self.0.wait();
    }
}

/// Waits for a peer to listen; on failure shows what it printed.
pub fn wait_port(addr: SocketAddr, dir: &Path) -> Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let said = ["nginx.stderr", "error.log", "haproxy.stderr"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .collect::<Vec<_>>()
        .join("\n");
    bail!("nothing listens on {addr}: {said}")
}

/// nginx with `workers` worker processes (0 = `auto`, one per core).
pub fn nginx(dir: &Path, workers: u32, http_body: &str) -> Result<Peer> {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes {w}; daemon off; pid {p}/nginx.pid; error_log {p}/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n{http_body}\n}}\n",
            p = dir.display(),
            w = if workers == 0 { "auto".to_owned() } else { workers.to_string() }
        ),
    )?;
    let log = std::fs::File::create(dir.join("nginx.stderr"))?;
    let child = Command::new("nginx")
        .args(["-c", &conf.display().to_string(), "-p", &dir.display().to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("nginx is not installed (apt-get install nginx)")?;
    Ok(Peer(child))
}

pub fn haproxy(dir: &Path, config: &str) -> Result<Peer> {
    let conf = dir.join("haproxy.cfg");
    std::fs::write(&conf, config)?;
    let log = std::fs::File::create(dir.join("haproxy.stderr"))?;
    let child = Command::new("haproxy")
        .args(["-f", &conf.display().to_string(), "-db"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("haproxy is not installed (apt-get install haproxy)")?;
    Ok(Peer(child))
}

/// Throughput and tail latency of one run.
#[derive(Debug, Clone)]
pub struct Load {
    pub name: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

impl Load {
    pub fn print(&self) {
        println!(
            "{:<28} {:>10.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  errors {}",
            self.name, self.rps, self.p50_ms, self.p99_ms, self.errors
        );
    }

    pub fn ratio(&self, peer: &Load) {
        println!(
            "{:<28} throughput {:.2}x {}, p99 {:.2}x",
            self.name,
            self.rps / peer.rps.max(1.0),
            peer.name,
            self.p99_ms / peer.p99_ms.max(0.001)
        );
    }
}

fn ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

/// `wrk --latency` against `url` with a Host header.
/// Runs `peer` and `ours` alternately `rounds` times and keeps the median
/// round of each (by throughput; its p99 goes with it): drift in the
/// machine's speed during the run then hits both alike, and one bad round
/// does not decide the ratio. Every round is printed.
pub fn alternate(
    rounds: u32,
    mut peer: impl FnMut() -> Result<Load>,
    mut ours: impl FnMut() -> Result<Load>,
) -> Result<(Load, Load)> {
    let (mut ps, mut os) = (Vec::new(), Vec::new());
    for r in 1..=rounds.max(1) {
        let (p, o) = (peer()?, ours()?);
        println!("  round {r}: {:.0} vs {:.0} req/s ({:.2}x)", o.rps, p.rps, o.rps / p.rps.max(1.0));
        ps.push(p);
        os.push(o);
    }
    let median = |mut v: Vec<Load>| {
        v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        v.swap_remove(v.len() / 2)
    };
    Ok((median(ps), median(os)))
}

pub fn wrk(name: &str, url: &str, host: &str, seconds: u32, connections: u32) -> Result<Load> {
    let mut cmd = Command::new("wrk");
    cmd.args(wrk_args(url, host, seconds, connections));
    run_wrk(name, cmd)
}

/// `wrk --latency` over HTTPS to `https://<host>:<port>/`, with `host`
/// resolving to 127.0.0.1: wrk names the URL's host in its TLS handshake
/// (SNI), and a proxy that serves only the certificates of names it knows
/// needs the real name there. The name is made to resolve in a mount
/// namespace of wrk's own (an `/etc/hosts` bound over the host's), so the
/// machine's resolver is left alone.
pub fn wrk_tls(name: &str, host: &str, port: u16, seconds: u32, connections: u32, dir: &Path) -> Result<Load> {
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("127.0.0.1 localhost {host}\n::1 localhost\n"))?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", "mount --bind \"$0\" /etc/hosts && exec wrk \"$@\""])
        .arg(&hosts)
        .args(wrk_args(&format!("https://{host}:{port}/"), host, seconds, connections));
    run_wrk(name, cmd)
}

fn wrk_args(url: &str, host: &str, seconds: u32, connections: u32) -> Vec<String> {
    vec![
        "-t2".into(),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
        "--latency".into(),
        "-H".into(),
        format!("Host: {host}"),
        url.into(),
    ]
}

fn run_wrk(name: &str, mut cmd: Command) -> Result<Load> {
    let out = cmd.output().context("wrk is not installed (apt-get install wrk; HTTPS runs also need unshare)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load { name: name.into(), rps: 0.0, p50_ms: 0.0, p99_ms: 0.0, errors: 0 };
    for line in text.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            load.rps = v.trim().parse().unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("50%") {
            load.p50_ms = ms(v).unwrap_or(0.0);
        } else if let Some(v) = t.strip_prefix("99%") {
            load.p99_ms = ms(v).unwrap_or(0.0);
        } else if t.starts_with("Non-2xx or 3xx responses:") || t.starts_with("Socket errors:") {
            load.errors += t.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse::<u64>().ok()).sum::<u64>();
        }
    }
    if load.rps == 0.0 {
        bail!("wrk printed no result:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(load)
}

/// `h2load` over HTTPS (HTTP/2) to `authority`, connecting to `connect`.
pub fn h2load(name: &str, authority: &str, connect: SocketAddr, requests: u32) -> Result<Load> {
    let out = Command::new("h2load")
        .args([
            "-n",
            &requests.to_string(),
            "-c",
            "16",
            "-m",
            "16",
            "-t",
            "1",
            &format!("--connect-to=127.0.0.1:{}", connect.port()),
            &format!("https://{authority}:{}/", connect.port()),
        ])
        .output()
        .context("h2load is not installed (apt-get install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut load = Load { name: name.into(), rps: 0.0, p50_ms: 0.0, p99_ms: 0.0, errors: 0 };
    for line in text.lines() {
        let t = line.trim();
        if let Some(rest) = t.strip_prefix("finished in") {
            // "finished in 1.23s, 16260.16 req/s, 1.2MB/s"
            load.rps = rest
                .split(',')
                .nth(1)
                .and_then(|s| s.trim().strip_suffix(" req/s"))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
        } else if let Some(rest) = t.strip_prefix("requests:") {
            let count = |what: &str| {
                rest.split(',')
                    .find(|p| p.contains(what))
                    .and_then(|p| p.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            load.errors = count("total").saturating_sub(count("succeeded"));
        } else if let Some(rest) = t.strip_prefix("time for request:") {
            // min max mean sd: use mean and max as p50/p99 stand-ins (h2load prints no percentiles).
            let cols: Vec<&str> = rest.split_whitespace().collect();
            load.p50_ms = cols.get(2).and_then(|v| ms(v)).unwrap_or(0.0);
            load.p99_ms = cols.get(1).and_then(|v| ms(v)).unwrap_or(0.0);
        }
    }
    if load.rps == 0.0 {
        bail!("h2load printed no result:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(load)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_wrk_units() {
        assert_eq!(super::ms("250.00us"), Some(0.25));
        assert_eq!(super::ms("1.50ms"), Some(1.5));
        assert_eq!(super::ms("2.00s"), Some(2000.0));
        assert_eq!(super::ms("x"), None);
    }
}
