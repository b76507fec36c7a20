//! The host ids this agent's containers run as: a container whose image runs
//! as root gets the 65,536 ids of its address slot from `userns_base` on. Two
//! agents on one host whose ranges overlap would put tenants of both in the
//! same host ids, so each agent holds its range on the host while it runs: a
//! file per range under the host's runtime directory, locked with `flock` for
//! as long as the agent lives (a crashed agent's lock goes with its process,
//! and the next agent to start removes its file). An agent whose range
//! overlaps one that is held does not start.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// A range of host ids held by this agent; released when dropped.
#[derive(Debug)]
pub struct UsernsClaim {
    path: PathBuf,
    /// Holds the lock (closing it releases it).
    _file: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another agent on the host holds ids of this range.
    #[error(
        "user-namespace ids {start}..{end} (userns_base {start}) overlap ids {other_start}..{other_end} \
         held by the node agent with data directory {other_dir} (pid {other_pid}); give each agent on a \
         host a userns_base whose {size} ids do not overlap another's"
    )]
    Overlap { start: u64, end: u64, size: u64, other_start: u64, other_end: u64, other_dir: String, other_pid: String },
    #[error("cannot record this agent's user-namespace range in {path}")]
    Io { path: String, source: std::io::Error },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClaimError + '_ {
    move |source| ClaimError::Io { path: path.display().to_string(), source }
}

/// A held range as its file records it: `START END PID DATA_DIR`.
struct Held {
    start: u64,
    end: u64,
    pid: String,
    dir: String,
}

fn parse(text: &str) -> Option<Held> {
    let mut f = text.trim_end_matches('\n').splitn(4, ' ');
    Some(Held {
        start: f.next()?.parse().ok()?,
        end: f.next()?.parse().ok()?,
        pid: f.next()?.to_owned(),
        dir: f.next().unwrap_or("?").to_owned(),
    })
}

/// Holds ids `start..end` in `run_dir/userns` for the agent with `data_dir`,
/// unless an agent that runs holds ids of it.
pub fn claim(run_dir: &Path, start: u64, end: u64, data_dir: &Path) -> Result<UsernsClaim, ClaimError> {
    let dir = run_dir.join("userns");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    // One agent at a time looks at the ranges and adds its own.
    let guard_path = dir.join(".lock");
    let guard =
        OpenOptions::new().create(true).truncate(false).write(true).open(&guard_path).map_err(io(&guard_path))?;
    flock(&guard, FlockOperation::LockExclusive).map_err(|e| io(&guard_path)(e.into()))?;
    for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        if path.extension().is_none_or(|e| e != "range") {
            continue;
        }
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(&path)(e)),
        };
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            // Nobody holds it: its agent is gone without removing it.
            Ok(()) => {
                tracing::info!(path = %path.display(), "removing the user-namespace range of an agent that is gone");
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        return Err(io(&path)(e));
                    }
                }
                continue;
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {}
            Err(e) => return Err(io(&path)(e.into())),
        }
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io(&path))?;
        let Some(held) = parse(&text) else {
            tracing::warn!(path = %path.display(), "a held user-namespace range that cannot be read; ignored");
            continue;
        };
        if held.start < end && start < held.end {
            return Err(ClaimError::Overlap {
                start,
                end,
                size: end - start,
                other_start: held.start,
                other_end: held.end,
                other_dir: held.dir,
                other_pid: held.pid,
            });
        }
    }
    let path = dir.join(format!("{start}.range"));
    let mut file =
        OpenOptions::new().create(true).truncate(true).write(true).read(true).open(&path).map_err(io(&path))?;
    flock(&file, FlockOperation::NonBlockingLockExclusive).map_err(|e| io(&path)(e.into()))?;
    writeln!(file, "{start} {end} {} {}", std::process::id(), data_dir.display()).map_err(io(&path))?;
    file.flush().map_err(io(&path))?;
    Ok(UsernsClaim { path, _file: file })
}

impl Drop for UsernsClaim {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "the user-namespace range file stays (the next agent removes it)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlapping_ranges_are_refused_while_held() {
        let run = tempfile::tempdir().unwrap();
        let first = claim(run.path(), 1000, 2000, Path::new("/var/lib/zeitwork/a")).unwrap();
        let e = claim(run.path(), 1500, 2500, Path::new("/var/lib/zeitwork/b")).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("1500..2500") && text.contains("1000..2000"), "{text}");
        assert!(text.contains("/var/lib/zeitwork/a") && text.contains(&std::process::id().to_string()), "{text}");
        assert!(claim(run.path(), 1000, 2000, Path::new("b")).is_err(), "the same range");
        assert!(claim(run.path(), 0, 1001, Path::new("b")).is_err(), "one id in common");
        let next = claim(run.path(), 2000, 3000, Path::new("b")).expect("the range after is free");
        drop(first);
        assert!(!run.path().join("userns/1000.range").exists(), "a released range leaves no file");
        let again = claim(run.path(), 500, 1500, Path::new("c")).expect("a released range is free again");
        drop((next, again));
    }

    #[test]
    fn a_range_whose_holder_is_gone_is_free() {
        let run = tempfile::tempdir().unwrap();
        let held = claim(run.path(), 1000, 2000, Path::new("a")).unwrap();
        // What a crash leaves: the file, without the lock (closed with its process).
        let path = held.path.clone();
        let text = std::fs::read_to_string(&path).unwrap();
        std::mem::forget(held);
        assert!(claim(run.path(), 1000, 2000, Path::new("b")).is_err(), "held until its process closes it");
        // The leaked file descriptor is this process's; a crashed agent's would be closed.
        // Stand in for it with a file nobody locks.
        let stale = run.path().join("userns/7000.range");
        std::fs::write(&stale, text.replace("1000 2000", "7000 8000")).unwrap();
        let _new = claim(run.path(), 7500, 7600, Path::new("b")).expect("a stale range is no one's");
        assert!(!stale.exists(), "the stale file is removed");
    }
}
