//! QEMU's machine protocol (QMP) over its Unix socket: one command at a time.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One QMP command (after the capabilities handshake).
pub async fn qmp(socket: &Path, command: &str) -> Result<serde_json::Value, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let _greeting = lines.next_line().await.map_err(|e| e.to_string())?;
    for cmd in ["qmp_capabilities", command] {
        w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        loop {
            let line = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("QMP closed")?;
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
            if cmd == command {
                return Ok(v.get("return").cloned().unwrap_or_default());
            }
            break;
        }
    }
    Err("no QMP answer".into())
}
