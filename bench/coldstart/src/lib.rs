//! What the start-up benchmarks share: waiting for the first HTTP 200, the
//! bare `runc run` floor, medians and percentiles.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Polls until the app answers 200; returns when it did.
pub async fn first_200(addr: SocketAddr, deadline: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await?;
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).await.is_ok() && &buf[9..12] == b"200" {
                return Ok(());
            }
        }
        if start.elapsed() > deadline {
            bail!("{addr} never answered 200");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bare runc: the same root filesystem, host network, no overlay.
pub async fn bare_runc(rootfs: &Path, port: u16, work: &Path, id: &str) -> Result<Duration> {
    let bundle = work.join(id);
    std::fs::create_dir_all(&bundle)?;
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 0, "gid": 0},
            "args": ["/bin/busybox", "httpd", "-f", "-p", port.to_string(), "-h", "/www"],
            "env": ["PATH=/bin"], "cwd": "/"},
        "root": {"path": rootfs, "readonly": true},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]}
    });
    std::fs::write(bundle.join("config.json"), config.to_string())?;
    let t = Instant::now();
    let mut child = tokio::process::Command::new("runc")
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("runc is needed (apt-get install runc)")?;
    first_200(SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(20)).await?;
    let took = t.elapsed();
    let _ = tokio::process::Command::new("runc").args(["kill", id, "KILL"]).output().await;
    let _ = child.wait().await;
    let _ = tokio::process::Command::new("runc").args(["delete", "--force", id]).output().await;
    Ok(took)
}

/// The `p`th percentile (0-100) of `v`, nearest rank.
pub fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}
