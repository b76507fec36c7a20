//! The serial console of a VM: the guest init's channel for the app's logs
//! and its exit report, and the tail of everything else, kept to explain a
//! failure.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::watch;
use zeitwork_guest_init::{parse_console_line, ConsoleLine};

use crate::logs::LogStore;

/// Console lines kept per instance for failure reasons.
const CONSOLE_TAIL: usize = 40;

pub(super) fn push_tail(tail: &std::sync::Mutex<VecDeque<String>>, line: String) {
    if let Ok(mut t) = tail.lock() {
        if t.len() == CONSOLE_TAIL {
            t.pop_front();
        }
        t.push_back(line);
    }
}

pub(super) fn tail_text(tail: &std::sync::Mutex<VecDeque<String>>, n: usize) -> String {
    let t = tail.lock().map(|t| t.iter().cloned().collect::<Vec<_>>()).unwrap_or_default();
    t[t.len().saturating_sub(n)..].join("\n")
}

/// Splits the console into the app's logs, the exit report and the rest.
pub(super) async fn read_console(
    id: String,
    out: tokio::process::ChildStdout,
    logs: Arc<LogStore>,
    tail: Arc<std::sync::Mutex<VecDeque<String>>>,
    code: watch::Sender<Option<Result<i32, String>>>,
) {
    let mut r = BufReader::with_capacity(64 * 1024, out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        match parse_console_line(&line) {
            ConsoleLine::Stdout(l) => logs.append(&id, "stdout", l.to_owned()).await,
            ConsoleLine::Stderr(l) => logs.append(&id, "stderr", l.to_owned()).await,
            ConsoleLine::Exit(c) => {
                // Nobody watching any more (the VM is gone) is fine.
                let _ = code.send(Some(Ok(c)));
            }
            ConsoleLine::Failed(reason) => {
                push_tail(&tail, line.trim_end().to_owned());
                let _ = code.send(Some(Err(reason.to_owned())));
            }
            ConsoleLine::Started | ConsoleLine::ProbeOk => {}
            ConsoleLine::Console(l) => {
                if !l.trim().is_empty() {
                    push_tail(&tail, l.to_owned());
                }
            }
        }
    }
}
