//! Instance logs on disk: one JSON-lines file per instance (timestamp, stream,
//! line), rotated at a size cap with one older file kept, readable after the
//! instance is gone, and followed by offset for live tails. Every driver
//! writes through it. Followers wake on the directory's inotify events (one
//! watch per store, shared by every follower), with a slow poll as a safety net.

use std::io::{BufRead, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, mpsc, Mutex};

use crate::LogLine;

/// Largest log file per instance before it is rotated (one older file is kept).
pub const LOG_CAP: u64 = 8 * 1024 * 1024;
/// Longest line kept; longer ones are cut and marked.
pub const MAX_LINE: usize = 16 * 1024;
/// Logs of instances untouched for this long are removed.
pub const RETENTION: Duration = Duration::from_secs(3 * 24 * 3600);

/// The log directory of a node.
#[derive(Debug, Clone)]
pub struct LogStore {
    dir: PathBuf,
    cap: u64,
    /// Where lines also go (a log drain), when set.
    forward: Option<Arc<zeitwork_telemetry::drain::Forwarder>>,
    /// Where each instance's lines go besides (its organisation's drains).
    routes: Arc<zeitwork_telemetry::drain::Routes>,
    /// Names the instance whose log file changed; started by the first follower.
    /// `None` inside when inotify is unavailable (followers then poll).
    changes: Arc<std::sync::OnceLock<Option<broadcast::Sender<Arc<str>>>>>,
}

/// How often a follower looks at its file without being woken.
const POLL: Duration = Duration::from_millis(100);
/// How often a follower woken by inotify looks anyway (a lost event never stalls it).
const SAFETY_POLL: Duration = Duration::from_secs(2);

/// Waits until `changes` names `id` (or events were missed); true when the watch ended.
async fn written(changes: &mut broadcast::Receiver<Arc<str>>, id: &str) -> bool {
    loop {
        match changes.recv().await {
            Ok(name) if &*name == id => return false,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return false,
            Err(broadcast::error::RecvError::Closed) => return true,
        }
    }
}

/// Watches `dir` and names each instance whose log file was written, created or
/// rotated. Ends when the directory goes away.
fn watch_dir(dir: &Path) -> std::io::Result<broadcast::Sender<Arc<str>>> {
    use rustix::fs::inotify::{self, CreateFlags, WatchFlags};
    let fd = inotify::init(CreateFlags::NONBLOCK | CreateFlags::CLOEXEC)?;
    inotify::add_watch(&fd, dir, WatchFlags::MODIFY | WatchFlags::CREATE | WatchFlags::MOVED_TO)?;
    // `register` is the unsafe spelling of the same call; its condition (the
    // descriptor stays open and the same while registered) holds for an `OwnedFd`
    // moved in, and this crate forbids `unsafe`.
    #[allow(deprecated)]
    let fd = tokio::io::unix::AsyncFd::new(fd)?;
    let (tx, _) = broadcast::channel(1024);
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        loop {
            let Ok(mut ready) = fd.readable().await else { return };
            let mut events = inotify::Reader::new(fd.get_ref(), &mut buf);
            loop {
                match events.next() {
                    Ok(e) => {
                        if e.events().intersects(inotify::ReadFlags::IGNORED) {
                            return;
                        }
                        let name = e.file_name().and_then(|n| n.to_str().ok());
                        if let Some(id) = name.and_then(|n| n.strip_suffix(".jsonl").or(n.strip_suffix(".jsonl.1"))) {
                            // Nobody following is fine.
                            let _ = tx.send(Arc::from(id));
                        }
                    }
                    Err(rustix::io::Errno::AGAIN) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "instance log watch ended; followers poll");
                        return;
                    }
                }
            }
        }
    });
    Ok(sender)
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl LogStore {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self { dir: dir.to_owned(), cap: LOG_CAP, forward: None, routes: Arc::default(), changes: Arc::default() })
    }

    /// A store that also forwards every line.
    pub fn forwarding(self, forward: Arc<zeitwork_telemetry::drain::Forwarder>) -> Self {
        Self { forward: Some(forward), ..self }
    }

    /// A store that also sends each instance's lines where `routes` says.
    pub fn routing(self, routes: Arc<zeitwork_telemetry::drain::Routes>) -> Self {
        Self { routes, ..self }
    }

    /// The forwarder lines go to, if any.
    pub fn forwarder(&self) -> Option<&Arc<zeitwork_telemetry::drain::Forwarder>> {
        self.forward.as_ref()
    }

    /// A store rotating at `cap` bytes (tests).
    pub fn with_cap(dir: &Path, cap: u64) -> std::io::Result<Self> {
        Ok(Self { cap, ..Self::new(dir)? })
    }

    pub fn path(&self, id: &str) -> Option<PathBuf> {
        valid_id(id).then(|| self.dir.join(format!("{id}.jsonl")))
    }

    /// Whether anything was ever logged for `id`.
    pub fn exists(&self, id: &str) -> bool {
        self.path(id).is_some_and(|p| p.exists() || p.with_extension("jsonl.1").exists())
    }

    /// Appends one line, rotating the file when it passed the cap.
    pub async fn append(&self, id: &str, stream: &str, mut line: String) {
        let Some(path) = self.path(id) else { return };
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str(" [line cut]");
        }
        let severity = zeitwork_telemetry::drain::severity(stream, &line);
        if let Some(f) = &self.forward {
            f.send(id, stream, severity, Utc::now(), &line);
        }
        for f in self.routes.of(id) {
            f.send(id, stream, severity, Utc::now(), &line);
        }
        let entry = LogLine { at: Utc::now(), stream: stream.into(), line, severity: Some(severity.name().into()) };
        let mut text = serde_json::to_string(&entry).unwrap_or_default();
        text.push('\n');
        if tokio::fs::metadata(&path).await.is_ok_and(|m| m.len() + text.len() as u64 > self.cap) {
            if let Err(e) = tokio::fs::rename(&path, path.with_extension("jsonl.1")).await {
                tracing::warn!(log = %path.display(), error = %e, "could not rotate an instance log");
            }
        }
        if let Ok(mut f) = tokio::fs::OpenOptions::new().create(true).append(true).open(&path).await {
            // tokio writes in the background; flush so readers see the line now.
            if f.write_all(text.as_bytes()).await.is_ok() {
                if let Err(e) = f.flush().await {
                    // Per line, so debug: a full disk would flood the agent's own log.
                    tracing::debug!(log = %path.display(), error = %e, "could not write an instance log");
                }
            }
        }
    }

    /// Copies each line of `stream` into the log of `id`; returns at end of stream.
    pub async fn capture(
        self: Arc<Self>,
        id: String,
        stream: impl tokio::io::AsyncRead + Unpin,
        name: &'static str,
        order: Arc<Mutex<()>>,
    ) {
        let mut lines = BufReader::new(stream).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    let _held = order.lock().await;
                    self.append(&id, name, line).await;
                }
                Ok(None) => return,
                // Not UTF-8: keep what can be read and go on.
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                    self.append(&id, name, "[line is not UTF-8]".into()).await;
                }
                Err(_) => return,
            }
        }
    }

    /// Lines of `id` at or after `since`, oldest first.
    pub fn read(&self, id: &str, since: Option<DateTime<Utc>>) -> Vec<LogLine> {
        let Some(path) = self.path(id) else { return Vec::new() };
        let mut out = Vec::new();
        for file in [path.with_extension("jsonl.1"), path] {
            if let Ok(text) = std::fs::read_to_string(file) {
                out.extend(
                    text.lines()
                        .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
                        .filter(|l| since.is_none_or(|s| l.at >= s)),
                );
            }
        }
        out
    }

    /// Lines of `id` since `since`, then every new line as it is written,
    /// until the receiver is dropped. Survives rotation.
    pub fn follow(&self, id: &str, since: Option<DateTime<Utc>>) -> mpsc::Receiver<LogLine> {
        let (tx, rx) = mpsc::channel(256);
        let Some(path) = self.path(id) else { return rx };
        let changes = self.changes.get_or_init(|| match watch_dir(&self.dir) {
            Ok(tx) => Some(tx),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch instance logs; followers poll");
                None
            }
        });
        let mut woken = changes.as_ref().map(|c| c.subscribe());
        let id: Arc<str> = Arc::from(id);
        let mut earlier = read_from(&path.with_extension("jsonl.1"), 0).0;
        let (current, mut offset) = read_from(&path, 0);
        earlier.extend(current);
        earlier.retain(|l| since.is_none_or(|s| l.at >= s));
        tokio::spawn(async move {
            let mut from_rotated = None;
            for l in earlier {
                if tx.send(l).await.is_err() {
                    return;
                }
            }
            loop {
                if tx.is_closed() {
                    return;
                }
                let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                if len < offset {
                    // Rotated: the rest of the old file is in `.1`.
                    from_rotated = Some(offset);
                    offset = 0;
                }
                let mut batch = Vec::new();
                if let Some(old) = from_rotated.take() {
                    batch.extend(read_from(&path.with_extension("jsonl.1"), old).0);
                }
                if len > offset {
                    let (lines, end) = read_from(&path, offset);
                    batch.extend(lines);
                    offset = end;
                }
                for l in batch {
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
                let closed = match &mut woken {
                    None => {
                        tokio::time::sleep(POLL).await;
                        false
                    }
                    Some(changes) => tokio::select! {
                        closed = written(changes, &id) => closed,
                        _ = tokio::time::sleep(SAFETY_POLL) => false,
                        _ = tx.closed() => return,
                    },
                };
                if closed {
                    // The watch ended: poll from now on.
                    woken = None;
                }
            }
        });
        rx
    }

    /// Removes logs untouched for longer than `age`.
    pub fn prune(&self, age: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for e in entries.flatten() {
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|d| d > age));
            if old {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    tracing::warn!(log = %e.path().display(), error = %err, "could not remove an old instance log");
                }
            }
        }
    }
}

/// Whole lines from `offset`; returns them and the offset after the last one.
fn read_from(path: &Path, offset: u64) -> (Vec<LogLine>, u64) {
    let Ok(mut f) = std::fs::File::open(path) else { return (Vec::new(), offset) };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return (Vec::new(), offset);
    }
    let mut reader = std::io::BufReader::new(f);
    let (mut out, mut end, mut buf) = (Vec::new(), offset, String::new());
    loop {
        buf.clear();
        match reader.read_line(&mut buf) {
            Ok(0) | Err(_) => break,
            // A line still being written: read it next time.
            Ok(_) if !buf.ends_with('\n') => break,
            Ok(n) => {
                end += n as u64;
                if let Ok(l) = serde_json::from_str::<LogLine>(buf.trim_end()) {
                    out.push(l);
                }
            }
        }
    }
    (out, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn appends_reads_since_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::with_cap(dir.path(), 400).unwrap();
        for i in 0..20 {
            store.append("ins_a", "stdout", format!("line {i}")).await;
        }
        let lines = store.read("ins_a", None);
        // Rotation keeps one older file: the newest lines are there, the oldest are gone.
        assert_eq!(lines.last().unwrap().line, "line 19");
        assert!(lines.len() < 20 && lines.len() >= 4, "{}", lines.len());
        assert!(dir.path().join("ins_a.jsonl.1").exists());
        let cut = lines[lines.len() - 2].at;
        assert!(store.read("ins_a", Some(cut)).len() <= 2);
        assert!(store.read("../etc/passwd", None).is_empty());
        assert!(!store.exists("ins_b"));
    }

    #[tokio::test]
    async fn prune_removes_only_logs_untouched_past_the_age() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::with_cap(dir.path(), 200).unwrap();
        for id in ["ins_old", "ins_new"] {
            for i in 0..8 {
                store.append(id, "stdout", format!("line {i}")).await;
            }
        }
        let week_ago = std::time::SystemTime::now() - Duration::from_secs(7 * 24 * 3600);
        for f in ["ins_old.jsonl", "ins_old.jsonl.1"] {
            let file = std::fs::File::options().append(true).open(dir.path().join(f)).unwrap();
            file.set_modified(week_ago).unwrap();
        }
        store.prune(RETENTION);
        // Both files of the old instance go, rotated one included; the fresh one stays whole.
        assert!(!store.exists("ins_old"));
        assert!(store.read("ins_old", None).is_empty());
        assert!(dir.path().join("ins_new.jsonl").exists() && dir.path().join("ins_new.jsonl.1").exists());
        assert_eq!(store.read("ins_new", None).last().unwrap().line, "line 7");
    }

    #[tokio::test]
    async fn routed_lines_go_to_their_own_instances_drains_only() {
        use zeitwork_telemetry::drain::{Forwarder, Options, Routes, Source, Target};
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = Target::Udp(sock.local_addr().unwrap().to_string());
        let drain = Forwarder::start(target, "node", &Options::default()).unwrap();
        let routes = Arc::new(Routes::default());
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path()).unwrap().routing(routes.clone());
        drain.register("ins_a", Source { org: "acme".into(), project: "web".into(), deployment: "d".into() });
        routes.set("ins_a", vec!["ldr_1".into()], vec![drain.clone()]);
        assert_eq!(routes.ids("ins_a").unwrap(), ["ldr_1"]);
        // The other instance's line is written first: had it been sent, it would arrive first.
        store.append("ins_b", "stdout", "from another org".into()).await;
        store.append("ins_a", "stdout", "from acme".into()).await;
        let mut buf = vec![0u8; 4096];
        let n = sock.recv(&mut buf).await.unwrap();
        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(got.ends_with("from acme") && got.contains("acme/web"), "{got}");
        routes.remove("ins_a");
        assert!(routes.of("ins_a").is_empty() && routes.ids("ins_a").is_none());
    }

    #[tokio::test]
    async fn long_lines_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::new(dir.path()).unwrap();
        store.append("ins_a", "stderr", "é".repeat(MAX_LINE)).await;
        let l = &store.read("ins_a", None)[0];
        assert!(l.line.ends_with("[line cut]") && l.line.len() <= MAX_LINE + 11, "{}", l.line.len());
    }

    #[tokio::test]
    async fn the_directory_watch_names_the_instance_written_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::with_cap(dir.path(), 200).unwrap();
        let mut changes = watch_dir(dir.path()).unwrap().subscribe();
        store.append("ins_b", "stdout", "one".into()).await;
        let first = tokio::time::timeout(Duration::from_secs(10), changes.recv()).await.expect("an event").unwrap();
        assert_eq!(&*first, "ins_b");
        // Unrelated files name nobody; a rotation names the instance.
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        for i in 0..5 {
            store.append("ins_c", "stdout", format!("line {i} of a log that rotates at 200 bytes")).await;
        }
        let mut named = Vec::new();
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), changes.recv()).await {
            named.push(n.to_string());
        }
        assert!(named.iter().all(|n| n == "ins_b" || n == "ins_c"), "{named:?}");
        assert!(named.iter().any(|n| n == "ins_c"), "{named:?}");
        assert!(dir.path().join("ins_c.jsonl.1").exists(), "the log rotated");
    }

    #[tokio::test]
    async fn follow_sees_new_lines_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::with_cap(dir.path(), 300).unwrap();
        store.append("ins_a", "stdout", "before".into()).await;
        let mut rx = store.follow("ins_a", None);
        assert_eq!(rx.recv().await.unwrap().line, "before");
        for i in 0..10 {
            store.append("ins_a", "stdout", format!("after {i}")).await;
            tokio::time::sleep(Duration::from_millis(120)).await;
        }
        let mut seen = Vec::new();
        while seen.len() < 10 {
            let l = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("a followed line").unwrap();
            seen.push(l.line);
        }
        let want: Vec<String> = (0..10).map(|i| format!("after {i}")).collect();
        assert_eq!(seen, want);
    }
}
