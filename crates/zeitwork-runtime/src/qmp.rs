//! QEMU's machine protocol (QMP) over its Unix socket: one command at a time.

use std::path::Path;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// One QMP command without arguments (after the capabilities handshake).
pub async fn qmp(socket: &Path, command: &str) -> Result<serde_json::Value, String> {
    qmp_with(socket, command, serde_json::Value::Null).await
}

/// One QMP command with `arguments` (`null` for none).
pub async fn qmp_with(socket: &Path, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, String> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| e.to_string())?;
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let _greeting = lines.next_line().await.map_err(|e| e.to_string())?;
    let handshake = serde_json::json!({"execute": "qmp_capabilities"});
    let mut call = serde_json::json!({"execute": command});
    if !arguments.is_null() {
        call["arguments"] = arguments;
    }
    for (i, msg) in [handshake, call].iter().enumerate() {
        w.write_all(format!("{msg}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        loop {
            let line = lines.next_line().await.map_err(|e| e.to_string())?.ok_or("QMP closed")?;
            let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| e.to_string())?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                return Err(e.get("desc").and_then(|d| d.as_str()).map(str::to_owned).unwrap_or_else(|| e.to_string()));
            }
            if i == 1 {
                return Ok(v.get("return").cloned().unwrap_or_default());
            }
            break;
        }
    }
    Err("no QMP answer".into())
}
