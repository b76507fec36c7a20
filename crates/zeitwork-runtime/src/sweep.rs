//! The sweeper: removes what instances of this node left on the host when
//! the node agent (or `zeitwork up`) was killed without stopping them —
//! OCI runtime containers, VMM processes, mounts, network namespaces, veth
//! and tap devices, cgroups and instance directories.
//!
//! Only what is provably this node's goes, so other nodes on the same host
//! and everything not Zeitwork's stay untouched:
//! - containers whose bundle lies in one of the node's instance directories;
//! - processes whose command line names a path inside them (QEMU's QMP
//!   socket, Firecracker's API socket, `runc run --bundle`);
//! - mounts below them, and loop devices backed by a file in them (the
//!   containers' writable layers);
//! - `zw-*` network namespaces holding an address of the node's range, and
//!   `zwh*`/`zwt*` devices with one;
//! - the range's own firewall table (`zeitwork_<a>_<b>`), when no known
//!   instance remains to be fenced by it (the drivers install it afresh);
//! - empty `zeitwork/zw-*` cgroups no OCI runtime knows a container for;
//! - instance directories no known instance owns.
//!
//! Every removal is logged; a removal that fails is logged with what leaked.
//!
//! The agent sweeps once before it starts any runtime, and then periodically
//! while it runs: then `known` holds every instance it runs, starts or stops,
//! and instance directories changed within `grace` count as known too (a
//! start in progress that the caller could not see yet).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

/// What the sweeper may look at, and the instances it must leave alone.
#[derive(Debug, Clone)]
pub struct Scope {
    /// The drivers' instance directories (one subdirectory per instance).
    pub dirs: Vec<PathBuf>,
    /// The node's instance range (a /16).
    pub base: Ipv4Addr,
    /// OCI runtime binaries (runc, crun) whose containers are looked at.
    pub oci_runtimes: Vec<PathBuf>,
    /// Instances that still run and keep everything they own.
    pub known: HashSet<String>,
    /// Instance directories changed within this long are left alone with
    /// everything of their instance (zero: none is; nothing runs yet).
    pub grace: Duration,
}

/// One thing the sweeper removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// `container`, `process`, `mount`, `loop`, `netns`, `link`, `firewall`, `cgroup` or `directory`.
    pub kind: &'static str,
    pub name: String,
}

impl Scope {
    fn in_range(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & 0xffff_0000 == u32::from(self.base) & 0xffff_0000
    }

    /// The instance a path inside one of the directories belongs to.
    fn instance_of<'p>(&self, path: &'p str) -> Option<&'p str> {
        self.dirs.iter().find_map(|d| {
            let d = d.to_str()?;
            let rest = path.strip_prefix(d)?.strip_prefix('/')?;
            let id = rest.split('/').next().filter(|id| !id.is_empty())?;
            Some(id)
        })
    }

    fn known_key(&self, key: &str) -> bool {
        self.known.iter().any(|id| crate::container::short_key(id) == key)
    }
}

/// Ids of the instance directories changed within `grace`.
fn recent(scope: &Scope) -> Vec<String> {
    if scope.grace.is_zero() {
        return Vec::new();
    }
    let mut ids = Vec::new();
    for dir in &scope.dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let changed = entry.metadata().and_then(|m| m.modified()).ok();
            // A time in the future (a clock step) counts as recent too.
            let young = changed.is_none_or(|t| !t.elapsed().is_ok_and(|age| age >= scope.grace));
            if young {
                ids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    ids
}

/// Sweeps the host once; returns what was removed.
pub async fn sweep(scope: &Scope) -> Vec<Removed> {
    let young = recent(scope);
    let extended;
    let scope = if young.is_empty() {
        scope
    } else {
        tracing::debug!(instances = ?young, "instance directories changed lately; left alone this time");
        extended = Scope { known: scope.known.iter().cloned().chain(young).collect(), ..scope.clone() };
        &extended
    };
    let mut removed = Vec::new();
    let listed = containers(scope, &mut removed).await;
    processes(scope, &mut removed);
    mounts(scope, &mut removed).await;
    loop_devices(scope, &mut removed).await;
    namespaces(scope, &mut removed).await;
    links(scope, &mut removed).await;
    firewall(scope, &mut removed).await;
    cgroups(scope, &listed, &mut removed);
    directories(scope, &mut removed).await;
    removed
}

fn note(removed: &mut Vec<Removed>, kind: &'static str, name: impl Into<String>) {
    let name = name.into();
    tracing::warn!(kind, name = %name, "removed a leftover of an instance this node does not run");
    removed.push(Removed { kind, name });
}

async fn output(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().await.map_err(|e| format!("{}: {e}", program.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[derive(serde::Deserialize)]
struct Listed {
    id: String,
    #[serde(default)]
    bundle: String,
}

/// Kills and deletes the node's containers; returns the ids of every
/// container the OCI runtimes still know (of any owner).
async fn containers(scope: &Scope, removed: &mut Vec<Removed>) -> HashSet<String> {
    let mut remaining = HashSet::new();
    for runtime in &scope.oci_runtimes {
        let list = match output(runtime, &["list", "--format", "json"]).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(runtime = %runtime.display(), error = %e, "no container list");
                continue;
            }
        };
        // runc prints `null` when it has no containers.
        let list: Vec<Listed> = serde_json::from_str::<Option<Vec<Listed>>>(&list).ok().flatten().unwrap_or_default();
        for c in list {
            let ours = c.id.starts_with("zw-")
                && scope.instance_of(&c.bundle).is_some_and(|id| !scope.known.contains(id) && c.id[3..] == *id);
            if !ours {
                remaining.insert(c.id);
                continue;
            }
            if let Err(e) = output(runtime, &["kill", "--all", &c.id, "KILL"]).await {
                tracing::debug!(container = %c.id, error = %e, "kill before delete");
            }
            match output(runtime, &["delete", "--force", &c.id]).await {
                Ok(_) => note(removed, "container", &c.id),
                Err(e) => {
                    tracing::warn!(container = %c.id, error = %e, "a leftover container could not be deleted");
                    remaining.insert(c.id);
                }
            }
        }
    }
    remaining
}

/// Kills processes (VMMs, a `runc run` parent) that name a path of an
/// instance no one knows.
fn processes(scope: &Scope, removed: &mut Vec<Removed>) {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let owner = cmdline.split(|b| *b == 0).filter_map(|a| std::str::from_utf8(a).ok()).find_map(|arg| {
            // Paths stand alone or after `name=` / `unix:` (QEMU's options).
            arg.split([',', '=', ':']).find_map(|p| scope.instance_of(p)).map(str::to_owned)
        });
        let Some(id) = owner.filter(|id| !scope.known.contains(id)) else { continue };
        let Some(p) = rustix::process::Pid::from_raw(pid as i32) else { continue };
        let name = format!("{pid} ({}, instance {id})", String::from_utf8_lossy(&cmdline).replace('\0', " ").trim());
        match rustix::process::kill_process(p, rustix::process::Signal::KILL) {
            Ok(()) => note(removed, "process", name),
            Err(e) => tracing::warn!(pid, instance = %id, error = %e, "a leftover process could not be killed"),
        }
    }
}

/// Mount points from `/proc/self/mountinfo`, with their file system type.
fn mount_table() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let point = unescape(f.get(4)?);
            let sep = f.iter().position(|x| *x == "-")?;
            Some((point, (*f.get(sep + 1)?).to_owned()))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a blank).
fn unescape(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn mounts(scope: &Scope, removed: &mut Vec<Removed>) {
    let mut points: Vec<String> = mount_table()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| scope.instance_of(p).is_some_and(|id| !scope.known.contains(id)))
        .collect();
    // Deepest first, each once.
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    points.dedup();
    for p in points {
        match output(Path::new("umount"), &["-l", &p]).await {
            Ok(_) => note(removed, "mount", p),
            Err(e) => tracing::warn!(mount = %p, error = %e, "a leftover mount could not be removed"),
        }
    }
}

/// Detaches loop devices backed by a file of an unknown instance (a
/// container's writable layer whose lazy unmount left the device attached).
async fn loop_devices(scope: &Scope, removed: &mut Vec<Removed>) {
    let Ok(entries) = std::fs::read_dir("/sys/block") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else { continue };
        // A removed backing file reads as "<path> (deleted)".
        let backing = backing.trim().trim_end_matches(" (deleted)");
        if scope.instance_of(backing).is_none_or(|id| scope.known.contains(id)) {
            continue;
        }
        let device = format!("/dev/{name}");
        match output(Path::new("losetup"), &["-d", &device]).await {
            Ok(_) => note(removed, "loop", format!("{device} ({backing})")),
            Err(e) => tracing::warn!(device, backing, error = %e, "a leftover loop device could not be detached"),
        }
    }
}

/// IPv4 addresses of `ip -4 -o addr show` output, by interface name.
fn addresses(text: &str) -> Vec<(String, Ipv4Addr)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let name = f.get(1)?.split('@').next()?.to_owned();
            let at = f.iter().position(|w| *w == "inet")?;
            let ip = f.get(at + 1)?.split('/').next()?.parse().ok()?;
            Some((name, ip))
        })
        .collect()
}

async fn namespaces(scope: &Scope, removed: &mut Vec<Removed>) {
    let ip = Path::new("ip");
    let Ok(list) = output(ip, &["netns", "list"]).await else { return };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(key) = ns.strip_prefix("zw-") else { continue };
        if scope.known_key(key) {
            continue;
        }
        let Ok(addrs) = output(ip, &["-n", ns, "-4", "-o", "addr", "show"]).await else { continue };
        if !addresses(&addrs).iter().any(|(_, a)| scope.in_range(*a)) {
            continue;
        }
        match output(ip, &["netns", "del", ns]).await {
            Ok(_) => note(removed, "netns", ns),
            Err(e) => tracing::warn!(netns = ns, error = %e, "a leftover network namespace could not be removed"),
        }
    }
}

async fn links(scope: &Scope, removed: &mut Vec<Removed>) {
    let ip = Path::new("ip");
    let Ok(text) = output(ip, &["-4", "-o", "addr", "show"]).await else { return };
    let mut seen = HashSet::new();
    for (name, addr) in addresses(&text) {
        let Some(key) = name.strip_prefix("zwh").or_else(|| name.strip_prefix("zwt")) else { continue };
        if !scope.in_range(addr) || scope.known_key(key) || !seen.insert(name.clone()) {
            continue;
        }
        match output(ip, &["link", "del", &name]).await {
            Ok(_) => note(removed, "link", name),
            Err(e) => tracing::warn!(link = %name, error = %e, "a leftover veth or tap could not be removed"),
        }
    }
}

/// The range's firewall table, with maps and sets of a run that is over:
/// only by the sweep at start (no grace) and when no instance it fences is
/// known to run. While the agent runs the table is its own, instances or
/// not: its default-deny rules, resolver redirect and tunnel rules fence the
/// next instance from its first packet.
async fn firewall(scope: &Scope, removed: &mut Vec<Removed>) {
    if !scope.known.is_empty() || !scope.grace.is_zero() {
        return;
    }
    match crate::net::remove_policy(scope.base).await {
        Ok(true) => note(removed, "firewall", format!("table inet {}", crate::net::table_of(scope.base))),
        Ok(false) => {}
        Err(e) => tracing::warn!(range = %scope.base, error = %e, "a leftover firewall table could not be removed"),
    }
}

/// Empty `zeitwork/zw-*` cgroups, in every hierarchy, of containers no OCI
/// runtime knows (`listed`) and no known instance owns.
fn cgroups(scope: &Scope, listed: &HashSet<String>, removed: &mut Vec<Removed>) {
    for (point, fstype) in mount_table() {
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let parent = Path::new(&point).join("zeitwork");
        let Ok(entries) = std::fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_prefix("zw-") else { continue };
            // A state directory alone means a container is being created.
            let creating = ["/run/runc", "/run/crun"].iter().any(|r| Path::new(r).join(&name).exists());
            if scope.known.contains(id) || listed.contains(&name) || creating || !entry.path().is_dir() {
                continue;
            }
            let procs = std::fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
            if !procs.trim().is_empty() {
                tracing::warn!(cgroup = %entry.path().display(), "a leftover cgroup still has processes; left alone");
                continue;
            }
            match std::fs::remove_dir(entry.path()) {
                Ok(()) => note(removed, "cgroup", entry.path().display().to_string()),
                Err(e) => {
                    tracing::warn!(cgroup = %entry.path().display(), error = %e, "a leftover cgroup could not be removed")
                }
            }
        }
    }
}

/// Instance directories (recognised by what a driver writes into them) of
/// instances no one knows.
async fn directories(scope: &Scope, removed: &mut Vec<Removed>) {
    const MARKS: [&str; 8] = ["config.json", "config.img", "upper", "rootfs", "tap", "vmm.pid", "disk.img", "layer"];
    for dir in &scope.dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let id = entry.file_name().to_string_lossy().into_owned();
            if scope.known.contains(&id) || !MARKS.iter().any(|m| path.join(m).exists()) {
                continue;
            }
            match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => note(removed, "directory", path.display().to_string()),
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "a leftover instance directory could not be removed")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> Scope {
        Scope {
            dirs: vec!["/var/lib/zw/instances".into()],
            base: "10.88.0.0".parse().unwrap(),
            oci_runtimes: vec![],
            known: ["keep".to_owned()].into(),
            grace: Duration::ZERO,
        }
    }

    #[test]
    fn directories_changed_within_the_grace_count_as_known() {
        let dir = tempfile::tempdir().unwrap();
        for id in ["fresh", "old"] {
            std::fs::create_dir(dir.path().join(id)).unwrap();
        }
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::open(dir.path().join("old")).unwrap().set_modified(long_ago).unwrap();
        let mut s = Scope { dirs: vec![dir.path().to_owned()], ..scope() };
        assert!(recent(&s).is_empty(), "no grace: nothing is spared");
        s.grace = Duration::from_secs(60);
        assert_eq!(recent(&s), vec!["fresh".to_owned()]);
    }

    #[test]
    fn paths_name_their_instance() {
        let s = scope();
        assert_eq!(s.instance_of("/var/lib/zw/instances/a1/rootfs"), Some("a1"));
        assert_eq!(s.instance_of("/var/lib/zw/instances/a1"), Some("a1"));
        assert_eq!(s.instance_of("/var/lib/zw/instances"), None);
        assert_eq!(s.instance_of("/var/lib/zw/instances2/a1"), None);
        assert_eq!(s.instance_of("/var/lib/zw/other/a1"), None);
    }

    #[test]
    fn only_the_nodes_range_counts() {
        let s = scope();
        assert!(s.in_range("10.88.3.2".parse().unwrap()));
        assert!(!s.in_range("10.89.0.2".parse().unwrap()));
        assert!(s.known_key(&crate::container::short_key("keep")));
    }

    #[test]
    fn interface_addresses_and_mountinfo_escapes() {
        let text = "5: zwhab12cd34@if4    inet 10.88.0.1/30 scope global zwhab12cd34\\       valid_lft forever\n\
                    1: lo    inet 127.0.0.1/8 scope host lo\n";
        assert_eq!(
            addresses(text),
            vec![("zwhab12cd34".into(), "10.88.0.1".parse().unwrap()), ("lo".into(), "127.0.0.1".parse().unwrap())]
        );
        assert_eq!(unescape("/a\\040b/c"), "/a b/c");
        assert_eq!(unescape("/plain\\04"), "/plain\\04");
    }
}
