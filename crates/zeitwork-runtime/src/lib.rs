//! Instance runtimes of the node agent: one [`Runtime`] interface, drivers
//! behind it: `container` (an OCI runtime such as runc, with its own network
//! namespace joined to the host by a veth pair) and the microVM drivers
//! `qemu` and `firecracker` ([`vm`]), which boot Zeitwork's guest kernel and
//! init ([`guest`]). [`select`] picks the best one that works on the host.
//!
//! A driver owns its instances' processes, mounts and network devices, and
//! nothing else: it does not talk to the operator or decide placement.

pub mod buildvm;
pub mod container;
pub mod guest;
pub mod jail;
pub mod logs;
pub mod net;
pub mod qmp;
pub mod select;
pub mod sweep;
pub mod vm;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zeitwork_image::ImageConfig;

/// The reason an app's exit code stands for, the same for every runtime
/// (an OCI runtime and the guest init both report 128 + n for signal n).
pub fn exit_reason(code: i32) -> String {
    match code {
        0 => "exited".into(),
        137 => "killed (SIGKILL, or out of memory)".into(),
        c if c > 128 => format!("terminated by signal {}", c - 128),
        c => format!("exited with code {c}"),
    }
}

/// Whether every directory down to `dir` lets other users pass (`o+x`), as
/// unprivileged VMMs and remapped container roots need to reach their own
/// instance's directory; else which one does not, and what to do.
pub(crate) fn reachable_by_others(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = dir.canonicalize().map_err(|e| format!("{}: {e}", dir.display()))?;
    for d in dir.ancestors() {
        let mode = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(format!(
                "{} (mode {:o}) keeps other users out of {}; make it traversable (chmod o+x, e.g. 0711)",
                d.display(),
                mode & 0o7777,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// Everything a driver needs to run one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub id: String,
    /// The image's unpacked root filesystem (shared, never written).
    pub rootfs: PathBuf,
    pub image: ImageConfig,
    /// The project's env vars (override the image's).
    pub env: Vec<(String, String)>,
    /// The port the app listens on.
    pub port: u16,
    pub vcpu: u32,
    pub memory_mib: u32,
    /// The image as an ext4 disk, for the drivers that [want one](Runtime::wants_disk).
    pub disk: Option<PathBuf>,
    /// Set when the instance is in a private project network: it asks the
    /// node's resolver (its gateway) for names, with this search domain
    /// (`<project>.internal`); otherwise the host's resolvers.
    pub dns_search: Option<String>,
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Running,
    Exited(ExitInfo),
}

impl InstanceState {
    /// The state a driver's exit watch stands for (set once the process ended).
    pub(crate) fn of(exit: &tokio::sync::watch::Receiver<Option<ExitInfo>>) -> Self {
        match exit.borrow().clone() {
            Some(e) => InstanceState::Exited(e),
            None => InstanceState::Running,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{0} is not installed or not usable here: {1}")]
    Unavailable(&'static str, String),
    #[error("instance {0} does not exist")]
    NotFound(String),
    #[error("{context}: {message}")]
    Failed { context: String, message: String },
}

impl RuntimeError {
    pub(crate) fn failed(context: impl Into<String>, message: impl ToString) -> Self {
        RuntimeError::Failed { context: context.into(), message: message.to_string() }
    }
}

/// A running instance as the driver reports it.
#[derive(Debug, Clone)]
pub struct Running {
    pub id: String,
    /// Where the app is reached from the host.
    pub address: SocketAddr,
}

/// The driver interface every runtime implements.
pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Whether instances need [`InstanceSpec::disk`] (the VM drivers do).
    fn wants_disk(&self) -> bool {
        false
    }
    /// Creates and starts an instance; returns once its process runs.
    fn start(&self, spec: &InstanceSpec) -> impl std::future::Future<Output = Result<Running, RuntimeError>> + Send;
    /// SIGTERM, `grace`, SIGKILL; returns how it ended.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl std::future::Future<Output = Result<ExitInfo, RuntimeError>> + Send;
    /// Removes everything the instance left (mounts, network, files).
    fn destroy(&self, id: &str) -> impl std::future::Future<Output = Result<(), RuntimeError>> + Send;
    fn state(&self, id: &str) -> impl std::future::Future<Output = Result<InstanceState, RuntimeError>> + Send;
    /// What the instance uses now (memory, CPU time).
    fn stats(&self, id: &str) -> impl std::future::Future<Output = Result<InstanceStats, RuntimeError>> + Send;
    /// The instance's captured output, oldest first (also after it was destroyed).
    fn logs(&self, id: &str) -> impl std::future::Future<Output = Result<Vec<LogLine>, RuntimeError>> + Send;
    /// What the driver saw of an instance that would help explain a failure
    /// (a VM's last console lines).
    fn diagnose(&self, id: &str) -> impl std::future::Future<Output = Option<String>> + Send {
        let _ = id;
        async { None }
    }
    /// Whether the driver can save a running instance's whole state and start
    /// another instance from it ([`vm::SnapshotMeta`]: QEMU's microVMs).
    fn snapshots(&self) -> bool {
        false
    }
    /// Saves running instance `id` as snapshot `key` (replacing an older one)
    /// and ends it; the instance is then destroyed as usual.
    fn snapshot(
        &self,
        id: &str,
        key: &str,
    ) -> impl std::future::Future<Output = Result<vm::SnapshotInfo, RuntimeError>> + Send {
        let _ = (id, key);
        let name = self.name();
        async move { Err(RuntimeError::Unavailable("snapshots", format!("the {name} runtime has none"))) }
    }
    /// Starts `spec` from snapshot `key` (used up either way); on failure nothing
    /// of the instance is left and it can be started the usual way.
    fn restore(
        &self,
        spec: &InstanceSpec,
        key: &str,
    ) -> impl std::future::Future<Output = Result<Running, RuntimeError>> + Send {
        let _ = (spec, key);
        let name = self.name();
        async move { Err(RuntimeError::Unavailable("snapshots", format!("the {name} runtime has none"))) }
    }
    /// The keys of the snapshots the driver holds.
    fn snapshot_keys(&self) -> Vec<String> {
        Vec::new()
    }
    /// Removes snapshot `key`, if there is one.
    fn discard_snapshot(&self, key: &str) -> impl std::future::Future<Output = ()> + Send {
        let _ = key;
        async {}
    }
}

/// Any of the drivers, chosen at run time.
// One per agent, made once: its size does not matter, and boxing the VM
// driver would only add a pointer to every call.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyRuntime {
    Container(container::ContainerRuntime),
    Vm(vm::VmRuntime),
}

macro_rules! each {
    ($self:ident, $r:ident => $e:expr) => {
        match $self {
            AnyRuntime::Container($r) => $e,
            AnyRuntime::Vm($r) => $e,
        }
    };
}

impl Runtime for AnyRuntime {
    fn name(&self) -> &'static str {
        each!(self, r => r.name())
    }
    fn wants_disk(&self) -> bool {
        each!(self, r => r.wants_disk())
    }
    async fn start(&self, spec: &InstanceSpec) -> Result<Running, RuntimeError> {
        each!(self, r => r.start(spec).await)
    }
    async fn stop(&self, id: &str, grace: Duration) -> Result<ExitInfo, RuntimeError> {
        each!(self, r => r.stop(id, grace).await)
    }
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        each!(self, r => r.destroy(id).await)
    }
    async fn state(&self, id: &str) -> Result<InstanceState, RuntimeError> {
        each!(self, r => r.state(id).await)
    }
    async fn stats(&self, id: &str) -> Result<InstanceStats, RuntimeError> {
        each!(self, r => r.stats(id).await)
    }
    async fn logs(&self, id: &str) -> Result<Vec<LogLine>, RuntimeError> {
        each!(self, r => r.logs(id).await)
    }
    async fn diagnose(&self, id: &str) -> Option<String> {
        each!(self, r => r.diagnose(id).await)
    }
    fn snapshots(&self) -> bool {
        each!(self, r => Runtime::snapshots(r))
    }
    async fn snapshot(&self, id: &str, key: &str) -> Result<vm::SnapshotInfo, RuntimeError> {
        each!(self, r => Runtime::snapshot(r, id, key).await)
    }
    async fn restore(&self, spec: &InstanceSpec, key: &str) -> Result<Running, RuntimeError> {
        each!(self, r => Runtime::restore(r, spec, key).await)
    }
    fn snapshot_keys(&self) -> Vec<String> {
        each!(self, r => Runtime::snapshot_keys(r))
    }
    async fn discard_snapshot(&self, key: &str) {
        each!(self, r => Runtime::discard_snapshot(r, key).await)
    }
}

/// One line an instance wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    pub at: chrono::DateTime<chrono::Utc>,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
    /// Syslog severity name (`err`, `warning`, `info`, …): a level the line states, else by stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
}

/// Resource use of a running instance.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InstanceStats {
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    /// CPU time used since the instance started.
    pub cpu_seconds: f64,
    pub processes: u64,
}
