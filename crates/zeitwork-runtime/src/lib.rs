//! Instance runtimes of the node agent: one [`Runtime`] interface, drivers
//! behind it. This part holds the `container` driver (an OCI runtime such as
//! runc, with its own network namespace joined to the host by a veth pair);
//! the microVM drivers implement the same interface.
//!
//! A driver owns its instances' processes, mounts and network devices, and
//! nothing else: it does not talk to the operator or decide placement.

pub mod container;
pub mod logs;
pub mod net;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use zeitwork_image::ImageConfig;

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
}

/// One line an instance wrote.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogLine {
    pub at: chrono::DateTime<chrono::Utc>,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
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
