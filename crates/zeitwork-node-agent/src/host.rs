//! The machine's own memory and disk, as gauges on the agent's `/metrics`:
//! what the node has left, for alerts before instances fail for room.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use zeitwork_telemetry::HttpMetrics;

/// How often the figures are read again.
const EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: &'static str,
}

/// Total and available bytes of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Use {
    pub total: u64,
    pub available: u64,
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn memory_from(meminfo: &str) -> Option<Use> {
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|k| k.saturating_mul(1024))
    };
    Some(Use { total: kib("MemTotal:")?, available: kib("MemAvailable:")? })
}

/// The filesystem holding `path`: its size and what an unprivileged writer may still use.
pub fn disk_of(path: &Path) -> std::io::Result<Use> {
    let s = rustix::fs::statvfs(path)?;
    let unit = if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize };
    Ok(Use { total: s.f_blocks.saturating_mul(unit), available: s.f_bavail.saturating_mul(unit) })
}

/// Registers `memory_bytes{kind}` and `disk_bytes{kind}` (kind = total | available)
/// and keeps them current until `stop`.
pub fn export(
    metrics: &HttpMetrics,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let memory = Family::<Kind, Gauge>::default();
    let disk = Family::<Kind, Gauge>::default();
    metrics.with_registry(|r| {
        r.register("memory_bytes", "The machine's memory in bytes: total, and available to new work", memory.clone());
        r.register(
            "disk_bytes",
            "The filesystem of the agent's data directory in bytes: total, and available",
            disk.clone(),
        );
    });
    let set = |f: &Family<Kind, Gauge>, u: Use| {
        f.get_or_create(&Kind { kind: "total" }).set(u.total.min(i64::MAX as u64) as i64);
        f.get_or_create(&Kind { kind: "available" }).set(u.available.min(i64::MAX as u64) as i64);
    };
    tokio::spawn(async move {
        loop {
            let dir = data_dir.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| memory_from(&m));
                (mem, disk_of(&dir))
            })
            .await;
            if let Ok((mem, dsk)) = read {
                if let Some(m) = mem {
                    set(&memory, m);
                }
                match dsk {
                    Ok(d) => set(&disk, d),
                    Err(e) => tracing::debug!(error = %e, "cannot read the data directory's filesystem"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(memory_from(text), Some(Use { total: 24576000 * 1024, available: 12288000 * 1024 }));
        assert_eq!(memory_from("MemTotal: 5 kB\n"), None, "no MemAvailable, no figure");
        assert_eq!(memory_from("garbage"), None);
    }

    #[test]
    fn the_disk_of_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = disk_of(dir.path()).unwrap();
        assert!(d.total > 0 && d.available <= d.total, "{d:?}");
        assert!(disk_of(Path::new("/no/such/dir")).is_err());
    }
}
