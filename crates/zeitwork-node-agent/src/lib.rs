//! The node agent: registers its machine with the operator, keeps a heartbeat,
//! and (in later parts) runs instances through a runtime driver.
//!
//! It talks to the operator only through the typed client with a node-agent
//! cluster token, and never touches the store.

pub mod build;
pub mod build_vm;
pub mod dns;
pub mod drains;
pub mod egress;
pub mod forward;
pub mod host;
pub mod instances;
pub mod logs;
pub mod probe;
pub mod sweep;
pub mod tunnel;
pub mod userns;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;
use zeitwork_api_types::{Capacity, Health, Node, RegisterNode};
use zeitwork_client::Client;
use zeitwork_telemetry::HttpMetrics;

/// Node agent settings.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeAgentConfig {
    pub listen: SocketAddr,
    /// Operator API URL.
    pub operator_url: String,
    /// A `node-agent` cluster token (or a platform admin token).
    pub token: Option<String>,
    /// Bearer token Prometheus presents to scrape `/metrics` (besides a platform admin token).
    pub metrics_token: Option<String>,
    pub hostname: String,
    pub region: String,
    /// URL the operator and edge proxies reach this agent at; derived from
    /// `listen` when absent.
    pub advertise_url: Option<String>,
    /// Cores of this machine the agent offers (all by default).
    pub vcpu: Option<u32>,
    /// MiB.
    pub memory: Option<u32>,
    /// vCPU the scheduler may place per core: CPU is shared between instances
    /// (cgroup weights), memory is a hard limit and never overcommitted.
    pub cpu_overcommit: u32,
    /// `auto` (the best driver that works here, by probe), `firecracker`,
    /// `qemu` or `container`.
    pub runtime: String,
    /// The QEMU binary of the `qemu` driver.
    pub qemu: PathBuf,
    /// The Firecracker binary; the `firecracker` driver is used only when set.
    pub firecracker: Option<PathBuf>,
    /// Run Firecracker under its jailer (production).
    pub jailer: Option<zeitwork_runtime::vm::Jailer>,
    /// The guest kernel of the microVM drivers (a bzImage or an ELF vmlinux);
    /// the host's newest kernel in /boot when absent.
    pub kernel: Option<PathBuf>,
    pub heartbeat_interval_secs: u64,
    /// Image cache and instance state.
    pub data_dir: PathBuf,
    /// The OCI runtime binary of the container driver.
    pub oci_runtime: PathBuf,
    /// The /16 instance addresses come from (a /30 per instance).
    pub instance_range: Ipv4Addr,
    /// UDP port of the resolver the node serves to its instances (`<project>.internal`);
    /// 0 turns it and the private project networks off. Instances reach it on port 53 of
    /// their gateway; nothing outside the node needs it.
    pub dns_port: u16,
    /// UDP port of this node's end of the tunnel that carries the private
    /// networks to other nodes (WireGuard); 0 turns the tunnel off, and the
    /// instances then reach only the members on their own node.
    pub tunnel_port: u16,
    /// `IPv4:port` other nodes send the tunnel to; by default the address of
    /// `advertise_url` (or `listen`) with `tunnel_port`.
    pub tunnel_endpoint: Option<String>,
    /// Resolvers asked for names outside the private networks; the host's
    /// (`/etc/resolv.conf`) when absent. Empty: such names are refused.
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    /// The resolver asked for the addresses of host names in egress allow-lists;
    /// the host's first name server (`/etc/resolv.conf`) when absent.
    pub dns_resolver: Option<SocketAddr>,
    pub registries: zeitwork_image::RegistryConfig,
    /// Readiness: HTTP GET on this path must answer below 500 (TCP connect when HTTP fails).
    pub health_path: String,
    pub start_timeout_secs: u64,
    pub stop_grace_secs: u64,
    /// Seconds between health checks of a ready instance.
    pub liveness_interval_secs: u64,
    /// Failed health checks in a row after which an instance is unhealthy.
    pub liveness_failures: u32,
    /// Disk the image cache may use, in bytes; least recently used images not in use go beyond it.
    pub image_cache_bytes: u64,
    /// Build images from source on this node (with buildah, when it is installed).
    pub builds: bool,
    /// The buildah binary; `buildah` on `PATH` when absent.
    pub buildah: Option<PathBuf>,
    /// Storage driver of the builds' layer stores: `vfs` (works with every buildah) or `overlay`.
    pub build_storage_driver: String,
    /// Disk the builds' per-project layer stores may use together, in bytes; the least
    /// recently built projects' stores go beyond it.
    pub build_cache_bytes: u64,
    /// Where builds run: `vm` (buildah inside a microVM of its own, booted with the
    /// runtime's guest kernel), `host` (buildah on this host, each `RUN` step in a
    /// user namespace), or `auto`: `vm` where the runtime is `qemu` with working KVM,
    /// `host` otherwise (under TCG a build takes many times longer).
    pub build_isolation: String,
    /// Also send instance logs to this drain: syslog at `udp://HOST:PORT`, `tcp://HOST:PORT`
    /// or `tls://HOST:PORT` (RFC 5424), or HTTP batches at `https://…` (JSON array),
    /// `loki+https://…` or `elasticsearch+https://…`.
    pub log_forward: Option<String>,
    /// PEM file of the CA that signed the drain's certificate (besides the public roots).
    pub log_forward_ca: Option<PathBuf>,
    /// Bearer token for an HTTP drain.
    pub log_forward_token: Option<String>,
    /// Days instance logs are kept on the node after their instance last wrote.
    pub log_retention_days: u32,
    /// Seconds between sweeps for leftovers (containers, processes, mounts, network
    /// namespaces, veth/tap devices, cgroups, directories) of instances this node does
    /// not run, besides the sweep at start; 0 turns the periodic sweep off.
    pub sweep_interval_secs: u64,
    /// First uid of the unprivileged users QEMU runs as: the VM on address slot
    /// `n` runs as `vmm_uid + n` (at most 16,000 per node). Own no files with
    /// these ids. 0 runs QEMU as root (not recommended).
    pub vmm_uid: u32,
    /// The group of QEMU's users; the host's `kvm` group when there is one (so
    /// `/dev/kvm` opens), else `vmm_uid`.
    pub vmm_gid: Option<u32>,
    /// Size of each container's writable layer in MiB (an ext4 image of its own:
    /// a full one answers ENOSPC, the host's disk is untouched); 0 lets
    /// containers write to the host's file system without a quota.
    pub instance_disk_mib: u32,
    /// First host uid/gid of the containers' user namespaces: a container whose
    /// image runs as root runs as root in a user namespace mapped to
    /// `userns_base + slot * 65536` and the 65,535 ids after it (its own range,
    /// by address slot; 16,000 slots). Own no files with these ids, and give each
    /// agent on a host its own base: an agent whose ids overlap those of one
    /// running on the host does not start. 0: root images run as host root.
    pub userns_base: u32,
    /// The host's runtime directory, shared by the agents of the host (each
    /// records the user-namespace ids it holds under `userns/`).
    pub run_dir: PathBuf,
    /// Save a sleeping deployment's microVM (memory and devices) on this node's
    /// disk and wake it from there instead of booting it (the `qemu` runtime;
    /// other runtimes ignore it).
    pub vm_snapshots: bool,
}

/// The values of `build_isolation`.
pub const BUILD_ISOLATIONS: &[&str] = &["auto", "vm", "host"];

/// Users the VMs of one node may run as (one per address slot).
pub const VMM_UIDS: u32 = 16_000;

impl Default for NodeAgentConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            operator_url: "http://127.0.0.1:8080".into(),
            token: None,
            metrics_token: None,
            hostname: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".into()),
            region: "local".into(),
            advertise_url: None,
            vcpu: None,
            memory: None,
            cpu_overcommit: 4,
            runtime: "auto".into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            firecracker: None,
            jailer: None,
            kernel: None,
            heartbeat_interval_secs: 5,
            data_dir: PathBuf::from("/var/lib/zeitwork/agent"),
            oci_runtime: PathBuf::from("runc"),
            instance_range: Ipv4Addr::new(10, 88, 0, 0),
            dns_port: 8053,
            tunnel_port: tunnel::DEFAULT_PORT,
            tunnel_endpoint: None,
            dns_upstreams: None,
            dns_resolver: None,
            registries: zeitwork_image::RegistryConfig::default(),
            health_path: "/".into(),
            start_timeout_secs: 60,
            stop_grace_secs: 10,
            liveness_interval_secs: 10,
            liveness_failures: 3,
            image_cache_bytes: 20 << 30,
            builds: true,
            buildah: None,
            build_storage_driver: "vfs".into(),
            build_cache_bytes: 20 << 30,
            build_isolation: "auto".into(),
            log_forward: None,
            log_forward_ca: None,
            log_forward_token: None,
            log_retention_days: 3,
            sweep_interval_secs: 300,
            vmm_uid: 900_000,
            vmm_gid: None,
            instance_disk_mib: zeitwork_runtime::container::DEFAULT_DISK_MIB,
            userns_base: 1_000_000_000,
            run_dir: PathBuf::from("/run/zeitwork"),
            vm_snapshots: true,
        }
    }
}

/// The data directory as QEMU's users and remapped container roots see it:
/// they pass through it to their own instance's directory (0711) but can
/// neither list it nor enter the image cache or the logs (0700).
fn close_data_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(dir.to_owned(), 0o711), (dir.join("images"), 0o700), (dir.join("logs"), 0o700)] {
        let failed = |source| AgentError::DataDir { path: path.display().to_string(), source };
        std::fs::create_dir_all(&path).map_err(failed)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    }
    Ok(())
}

/// The gid of group `name` in `/etc/group`.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok())?
    })
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("config field `{field}`: {message}")]
    Config { field: &'static str, message: String },
    #[error("cannot listen on {addr}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot create {path}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot register with the operator")]
    Register(#[from] zeitwork_client::ClientError),
    #[error(transparent)]
    Userns(#[from] userns::ClaimError),
}

impl NodeAgentConfig {
    pub fn validate(&self) -> Result<(), AgentError> {
        let err = |field, message: String| Err(AgentError::Config { field, message });
        if self.token.as_deref().unwrap_or("").is_empty() {
            return err("token", "a node-agent token is required (ZEITWORK_TOKEN or --token); create one with `zeitwork tokens create --cluster node-agent`".into());
        }
        if self.instance_range.octets()[2..] != [0, 0] {
            // The agent owns the whole /16: it sweeps it of instances it does not know.
            return err(
                "instance_range",
                format!(
                    "{} is not the start of a /16; give an address ending in .0.0 (e.g. 10.88.0.0), a /16 of its own per agent on a host",
                    self.instance_range
                ),
            );
        }
        if self.metrics_token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return err("metrics_token", "leave it out, or set a non-empty token".into());
        }
        if let Err(e) = zeitwork_api_types::validate::hostname("hostname", &self.hostname) {
            return err("hostname", e.message);
        }
        if let Err(e) = zeitwork_api_types::validate::dns_label("region", &self.region) {
            return err("region", e.message);
        }
        if !(self.operator_url.starts_with("http://") || self.operator_url.starts_with("https://")) {
            return err("operator_url", format!("{:?} is not an http(s) URL", self.operator_url));
        }
        if self.heartbeat_interval_secs == 0 || self.heartbeat_interval_secs > 60 {
            return err("heartbeat_interval_secs", "use 1 to 60".into());
        }
        if !zeitwork_runtime::select::RUNTIMES.contains(&self.runtime.as_str()) {
            return err(
                "runtime",
                format!("{:?} is not a runtime; use {}", self.runtime, zeitwork_runtime::select::RUNTIMES.join(", ")),
            );
        }
        if self.runtime == "firecracker" && self.firecracker.is_none() {
            return err("firecracker", "the firecracker runtime needs the path of a firecracker binary".into());
        }
        if let Some(k) = &self.kernel {
            if !k.is_file() {
                return err("kernel", format!("{} does not exist", k.display()));
            }
        }
        if self.liveness_interval_secs == 0 || self.liveness_interval_secs > 3600 {
            return err("liveness_interval_secs", "use 1 to 3600".into());
        }
        if let Some(t) = &self.log_forward {
            if let Err(e) = zeitwork_telemetry::drain::Target::parse(t) {
                return err("log_forward", e);
            }
        }
        if let Some(ca) = &self.log_forward_ca {
            if !ca.is_file() {
                return err("log_forward_ca", format!("{} does not exist", ca.display()));
            }
        }
        if !(1..=3650).contains(&self.log_retention_days) {
            return err("log_retention_days", "use 1 to 3650".into());
        }
        if self.sweep_interval_secs > 86_400 {
            return err("sweep_interval_secs", "use 1 to 86400 seconds, or 0 to sweep only at start".into());
        }
        if !matches!(self.build_storage_driver.as_str(), "vfs" | "overlay") {
            return err("build_storage_driver", format!("{:?} is not vfs or overlay", self.build_storage_driver));
        }
        if !BUILD_ISOLATIONS.contains(&self.build_isolation.as_str()) {
            return err(
                "build_isolation",
                format!("{:?} is not a build isolation; use {}", self.build_isolation, BUILD_ISOLATIONS.join(", ")),
            );
        }
        if self.build_isolation == "vm" && self.runtime == "container" {
            return err(
                "build_isolation",
                "vm builds boot the microVM runtime's guest kernel; use runtime qemu (or auto), or build_isolation host"
                    .into(),
            );
        }
        if !(1..=64).contains(&self.cpu_overcommit) {
            return err("cpu_overcommit", format!("{} is out of range; use 1 (no sharing) to 64", self.cpu_overcommit));
        }
        if self.liveness_failures == 0 || self.liveness_failures > 100 {
            return err("liveness_failures", "use 1 to 100".into());
        }
        if self.vmm_uid != 0
            && (self.vmm_uid < 1000 || self.vmm_uid.checked_add(VMM_UIDS).is_none_or(|e| e > i32::MAX as u32))
        {
            return err(
                "vmm_uid",
                format!(
                    "{} is out of range; use 0 (root) or a first uid of {VMM_UIDS} unused ids from 1000 up",
                    self.vmm_uid
                ),
            );
        }
        if self.instance_disk_mib != 0 && !(16..=1 << 20).contains(&self.instance_disk_mib) {
            return err(
                "instance_disk_mib",
                format!("{} is out of range; use 16 to 1048576 (1 TiB), or 0 for no quota", self.instance_disk_mib),
            );
        }
        let userns_end = u64::from(self.userns_base) + u64::from(VMM_UIDS) * 65_536;
        if self.userns_base != 0 && (self.userns_base < 65_536 || userns_end > u64::from(u32::MAX)) {
            return err(
                "userns_base",
                format!(
                    "{} is out of range; use 0 (no remap) or 65536 to {}",
                    self.userns_base,
                    u64::from(u32::MAX) - u64::from(VMM_UIDS) * 65_536
                ),
            );
        }
        let vmm_end = u64::from(self.vmm_uid) + u64::from(VMM_UIDS);
        if self.userns_base != 0
            && self.vmm_uid != 0
            && u64::from(self.vmm_uid) < userns_end
            && vmm_end > u64::from(self.userns_base)
        {
            return err(
                "vmm_uid",
                format!(
                    "QEMU's users {}..{vmm_end} overlap the user namespaces from userns_base {}",
                    self.vmm_uid, self.userns_base
                ),
            );
        }
        if self.vmm_gid == Some(0) {
            return err("vmm_gid", "0 is root's group; use an unprivileged group (or leave it out for `kvm`)".into());
        }
        if let Some(e) = &self.tunnel_endpoint {
            if let Err(e) = zeitwork_api_types::validate::tunnel_endpoint("tunnel_endpoint", e) {
                return err("tunnel_endpoint", e.message);
            }
        }
        if !self.health_path.starts_with('/') || self.health_path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return err("health_path", format!("{:?} is not a URL path like /healthz", self.health_path));
        }
        Ok(())
    }

    /// The users QEMU runs as, or none (root).
    pub fn vmm_user(&self) -> Option<zeitwork_runtime::vm::VmmUser> {
        (self.vmm_uid != 0).then(|| zeitwork_runtime::vm::VmmUser {
            uid: self.vmm_uid,
            gid: self.vmm_gid.or_else(|| group_id("kvm")).unwrap_or(self.vmm_uid),
        })
    }

    /// The machine's cores and memory as offered.
    fn physical(&self) -> Capacity {
        let vcpu =
            self.vcpu.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        let memory = self.memory.unwrap_or_else(host_memory_mib);
        Capacity { vcpu, memory }
    }

    /// What the scheduler may place: cores x `cpu_overcommit` vCPU, memory as is.
    fn capacity(&self) -> Capacity {
        let p = self.physical();
        Capacity { vcpu: p.vcpu.saturating_mul(self.cpu_overcommit), memory: p.memory }
    }
}

fn host_memory_mib() -> u32 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| (kb / 1024) as u32)
        .unwrap_or(1024)
}

/// A running node agent.
#[derive(Debug)]
pub struct NodeAgent {
    addr: SocketAddr,
    node: Node,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The instance range whose firewall table goes once the instances have stopped.
    range: Ipv4Addr,
    /// The tunnel to other nodes, closed at shutdown.
    tunnel: Option<Arc<tunnel::Tunnel>>,
    /// The host ids this agent's containers run as, held on the host until it stops.
    userns: Option<userns::UsernsClaim>,
}

impl NodeAgent {
    /// Listens, registers (retrying while the operator is unreachable) and starts heartbeats.
    pub async fn start(config: NodeAgentConfig) -> Result<NodeAgent, AgentError> {
        config.validate()?;
        // Before anything runs: no container may start in ids another agent's tenants have.
        let userns = match config.userns_base {
            0 => None,
            base => {
                let (run_dir, data_dir) = (config.run_dir.clone(), config.data_dir.clone());
                let (start, end) = (u64::from(base), u64::from(base) + u64::from(VMM_UIDS) * 65_536);
                let claimed = tokio::task::spawn_blocking(move || userns::claim(&run_dir, start, end, &data_dir))
                    .await
                    .map_err(|e| {
                        AgentError::Userns(userns::ClaimError::Io {
                            path: config.run_dir.display().to_string(),
                            source: std::io::Error::other(e.to_string()),
                        })
                    })??;
                Some(claimed)
            }
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let addr = listener.local_addr().map_err(|source| AgentError::Listen { addr: config.listen, source })?;
        let advertise = config.advertise_url.clone().unwrap_or_else(|| {
            let ip = if addr.ip().is_unspecified() { "127.0.0.1".to_owned() } else { addr.ip().to_string() };
            format!("http://{ip}:{}", addr.port())
        });
        let client = Client::new(&config.operator_url, config.token.clone());
        close_data_dir(&config.data_dir)?;
        let log_dir = config.data_dir.join("logs");
        let forward = match config.log_forward.as_deref().map(zeitwork_telemetry::drain::Target::parse) {
            Some(Ok(target)) => {
                let options = zeitwork_telemetry::drain::Options {
                    ca_pem: None,
                    ca_file: config.log_forward_ca.clone(),
                    token: config.log_forward_token.clone(),
                    // The node's own drain is the operator's choice, internal or not.
                    reach: None,
                };
                Some(
                    zeitwork_telemetry::drain::Forwarder::start(target, &config.hostname, &options)
                        .map_err(|message| AgentError::Config { field: "log_forward", message })?,
                )
            }
            _ => None,
        };
        let mut store = zeitwork_runtime::logs::LogStore::new(&log_dir)
            .map_err(|source| AgentError::DataDir { path: log_dir.display().to_string(), source })?;
        if let Some(f) = &forward {
            store = store.forwarding(f.clone());
        }
        let org_drains = Arc::new(drains::OrgDrains::new(&config.hostname));
        let store = store.routing(org_drains.routes.clone());
        let logs = Arc::new(store);
        logs.prune(Duration::from_secs(u64::from(config.log_retention_days) * 86_400));
        // What instances of an earlier run left behind (the agent was killed
        // before it could stop them) goes before any runtime starts.
        let sweep_scope = zeitwork_runtime::sweep::Scope {
            dirs: vec![config.data_dir.join("instances"), config.data_dir.join("vms")],
            base: config.instance_range,
            oci_runtimes: vec![config.oci_runtime.clone()],
            known: Default::default(),
            grace: Duration::ZERO,
        };
        let leftovers = zeitwork_runtime::sweep::sweep(&sweep_scope).await;
        if !leftovers.is_empty() {
            tracing::warn!(count = leftovers.len(), "removed what an earlier run left behind");
        }
        let options = zeitwork_runtime::select::SelectOptions {
            requested: config.runtime.clone(),
            dir: config.data_dir.clone(),
            oci_runtime: config.oci_runtime.clone(),
            qemu: config.qemu.clone(),
            firecracker: config.firecracker.clone(),
            jailer: config.jailer.clone(),
            kernel: config.kernel.clone(),
            base: config.instance_range,
            disk_budget: config.image_cache_bytes,
            vmm_user: config.vmm_user(),
            confinement: zeitwork_runtime::container::Confinement {
                disk_mib: config.instance_disk_mib,
                userns_base: (config.userns_base != 0).then_some(config.userns_base),
            },
        };
        let selected = match zeitwork_runtime::select::select(&options, logs.clone()).await {
            Ok(s) => {
                tracing::info!(runtime = s.name, why = %s.detail, "runtime chosen");
                Some(s)
            }
            Err(e) => {
                tracing::error!(error = %e, requested = %config.runtime, "no runtime; this node cannot run instances");
                None
            }
        };
        // What build VMs boot: the runtime's VMM and guest files.
        let build_vm_boot = selected.as_ref().and_then(|s| match &s.runtime {
            zeitwork_runtime::AnyRuntime::Vm(v) => Some((v.vmm().clone(), v.assets().clone())),
            zeitwork_runtime::AnyRuntime::Container(_) => None,
        });
        let tunnel = start_tunnel(&config, &advertise).await;
        let registration = RegisterNode {
            hostname: config.hostname.clone(),
            region: config.region.clone(),
            address: advertise,
            capacity: config.capacity(),
            physical: Some(config.physical()),
            runtime: Some(selected.as_ref().map_or("container", |s| s.name).into()),
            runtime_detail: Some(match &selected {
                Some(s) if config.vm_snapshots && zeitwork_runtime::Runtime::snapshots(&s.runtime) => {
                    format!("{}; wakes from VM snapshots", s.detail).chars().take(2000).collect()
                }
                Some(s) => s.detail.chars().take(2000).collect(),
                None => "no runtime works on this node (see the agent's log)".into(),
            }),
            tunnel: tunnel.as_ref().map(|(t, _)| t.clone()),
        };
        let tunnel = tunnel.map(|(_, device)| device);
        let mut node = register(&client, &registration).await?;
        tracing::info!(node = %node.id, hostname = %node.hostname, region = %node.region, "registered with the operator");
        // From here on the node acts with its own credential (for itself only);
        // the configured token only registers.
        let registrar = client.clone();
        let client = match node.credential.take() {
            Some(own) => Client::new(&config.operator_url, Some(own)),
            None => client,
        };

        let metrics = HttpMetrics::new("zeitwork_node_agent");
        let swept = sweep::Swept::register(&metrics);
        org_drains.register(&metrics);
        swept.count(&leftovers);
        let table: instances::Table = Arc::default();
        let forwarder = Arc::new(forward::Forwarder::new(table.clone(), &config.operator_url));
        // Requests naming an instance are always forwarded, whatever their path.
        let runtime_cell = Arc::new(std::sync::OnceLock::new());
        let own = logs::LogsState { forwarder: forwarder.clone(), logs: logs.clone(), runtime: runtime_cell.clone() };
        let app = Router::new()
            .route("/health", get(|| async { Json(Health { status: "ok".into() }) }))
            .route(
                "/metrics",
                get(logs::scrape).with_state(logs::ScrapeState {
                    metrics: metrics.clone(),
                    token: config.metrics_token.clone().map(Into::into),
                    forwarder: forwarder.clone(),
                    org_drains: org_drains.clone(),
                }),
            )
            .route("/v1/instances/{id}/logs", get(logs::instance_logs).with_state(own.clone()))
            .route("/v1/instances/{id}/metrics", get(logs::instance_metrics).with_state(own))
            .route(
                "/v1/probe",
                axum::routing::post(probe::probe).with_state(probe::ProbeState {
                    forwarder: forwarder.clone(),
                    http: zeitwork_client::probe::client(),
                }),
            )
            .fallback(|| async { forward::refuse(axum::http::StatusCode::NOT_FOUND, "not found") })
            .layer(axum::middleware::from_fn_with_state(forwarder, forward::route))
            .layer(axum::middleware::from_fn_with_state(metrics.clone(), zeitwork_telemetry::track));
        let (tx, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        tasks.push(host::export(&metrics, config.data_dir.clone(), rx.clone()));
        if let Some(f) = forward.clone() {
            // The forwarder's running totals, as counters.
            let sent = prometheus_client::metrics::counter::Counter::<u64>::default();
            let dropped = prometheus_client::metrics::counter::Counter::<u64>::default();
            metrics.with_registry(|r| {
                r.register("log_lines_forwarded", "Instance log lines sent to the syslog receiver", sent.clone());
                r.register(
                    "log_lines_dropped",
                    "Instance log lines dropped: the forwarding queue was full",
                    dropped.clone(),
                );
            });
            let mut stop = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                    let s = f.sent.load(std::sync::atomic::Ordering::Relaxed);
                    let d = f.dropped.load(std::sync::atomic::Ordering::Relaxed);
                    sent.inc_by(s.saturating_sub(sent.get()));
                    dropped.inc_by(d.saturating_sub(dropped.get()));
                }
            }));
        }
        // Uploaded archives are pulled from the operator, with the pull
        // credential that comes with each assignment (never this agent's token).
        let mut registries = config.registries.clone();
        let archives = zeitwork_api_types::ARCHIVE_REGISTRY.to_owned();
        registries.endpoints.entry(archives).or_insert_with(|| config.operator_url.clone());
        let images = zeitwork_image::ImageStore::new(&config.data_dir.join("images"), registries, Default::default());
        match (images, selected) {
            (Ok(images), Some(selected)) => {
                let settings = instances::Settings {
                    node: node.id.clone(),
                    health_path: config.health_path.clone(),
                    start_timeout: Duration::from_secs(config.start_timeout_secs),
                    stop_grace: Duration::from_secs(config.stop_grace_secs),
                    every: Duration::from_secs(1),
                    liveness_every: Duration::from_secs(config.liveness_interval_secs),
                    liveness_failures: config.liveness_failures,
                    image_cache_bytes: config.image_cache_bytes,
                    forward: forward.clone(),
                    org_drains: org_drains.clone(),
                    private_networks: None,
                    egress_names: Default::default(),
                    snapshots: (config.vm_snapshots && zeitwork_runtime::Runtime::snapshots(&selected.runtime))
                        .then(|| instances::Snapshots::new(&metrics)),
                    boot: instances::BootTimes::new(&metrics),
                    tunnel: None,
                };
                let mut settings = settings;
                if config.dns_port != 0 {
                    match start_resolver(&config, table.clone(), rx.clone()).await {
                        Ok(task) => {
                            tasks.push(task);
                            settings.private_networks = Some(config.instance_range);
                            match egress::resolver(config.dns_resolver) {
                                Some(server) => tasks.push(tokio::spawn(egress::run(
                                    table.clone(),
                                    settings.egress_names.clone(),
                                    server,
                                    rx.clone(),
                                ))),
                                None => tracing::warn!(
                                    "no resolver for host names in egress allow-lists (set dns_resolver); they allow nothing"
                                ),
                            }
                            settings.tunnel = tunnel.clone();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "no resolver; instances use the host's and have no private network")
                        }
                    }
                }
                let runtime = Arc::new(selected.runtime);
                let _ = runtime_cell.set(runtime.clone());
                let in_use = Arc::new(sweep::InUse::default());
                if config.sweep_interval_secs > 0 {
                    tasks.push(tokio::spawn(sweep::run(
                        sweep_scope,
                        table.clone(),
                        in_use.clone(),
                        Duration::from_secs(config.sweep_interval_secs),
                        swept,
                        rx.clone(),
                    )));
                }
                tasks.push(tokio::spawn(instances::run(
                    client.clone(),
                    Arc::new(images),
                    runtime,
                    table,
                    settings,
                    in_use,
                    rx.clone(),
                )));
            }
            (Err(e), _) => tracing::error!(error = %e, "no image cache; this node cannot run instances"),
            (_, None) => {}
        }
        match (config.builds, build::find_buildah(config.buildah.as_deref())) {
            (true, Some(buildah)) => match build_vm_of(&config, build_vm_boot.as_ref(), &buildah).await {
                Ok(vm) => {
                    let settings = build::BuilderSettings {
                        node: node.id.clone(),
                        buildah,
                        dir: config.data_dir.join("builds"),
                        registries: config.registries.clone(),
                        storage_driver: config.build_storage_driver.clone(),
                        cache_bytes: config.build_cache_bytes,
                        vm,
                    };
                    tasks.push(tokio::spawn(build::run(client.clone(), settings, rx.clone())));
                }
                Err(e) => {
                    tracing::error!(error = %e, "build_isolation = \"vm\" cannot work here: this node builds nothing")
                }
            },
            (true, None) => tracing::info!("no buildah on this node; builds from source run on other nodes"),
            (false, _) => {}
        }
        // Logs of instances gone for longer than the retention are removed, hourly.
        let (prune_logs, mut prune_stop, keep) =
            (logs.clone(), rx.clone(), Duration::from_secs(u64::from(config.log_retention_days) * 86_400));
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(3600)) => prune_logs.prune(keep),
                    _ = prune_stop.wait_for(|s| *s) => return,
                }
            }
        }));
        let mut server_rx = rx.clone();
        let server = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // A dropped sender also means stop.
                    let _ = server_rx.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the agent's HTTP server failed");
            }
        });
        tasks.push(server);
        let heartbeats = tokio::spawn(heartbeat_loop(
            client,
            registrar,
            registration,
            node.id.clone(),
            Duration::from_secs(config.heartbeat_interval_secs),
            rx,
        ));
        tasks.push(heartbeats);
        Ok(NodeAgent { addr, node, shutdown: tx, tasks, range: config.instance_range, tunnel, userns })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Stops every task (the instances with them), closes the tunnel to other
    /// nodes, then removes the range's firewall table, which fences nothing
    /// any more. When a task failed, instances may still run: the table
    /// stays, and the next start sweeps it.
    pub async fn shutdown(self) {
        // The tasks may have ended already; then no one listens.
        let _ = self.shutdown.send(true);
        let mut clean = true;
        for t in self.tasks {
            if let Err(e) = t.await {
                clean = false;
                tracing::error!(error = %e, "a node agent task failed while stopping");
            }
        }
        // Closed, not left to the last handle: tasks of stopped instances may still hold one.
        if let Some(tunnel) = self.tunnel {
            if let Err(e) = tokio::task::spawn_blocking(move || tunnel.close()).await {
                tracing::error!(error = %e, "closing the tunnel to other nodes panicked");
            }
        }
        if !clean {
            tracing::warn!(range = %self.range, "the instance firewall stays: instances may still run");
            // So do this agent's user-namespace ids, held until the process ends.
            std::mem::forget(self.userns);
            return;
        }
        match zeitwork_runtime::net::remove_policy(self.range).await {
            // No nftables here: there was no firewall either (and no instances).
            Ok(_) | Err(zeitwork_runtime::RuntimeError::Unavailable(..)) => {}
            Err(e) => tracing::warn!(range = %self.range, error = %e, "the instance firewall was left on the host"),
        }
    }
}

async fn register(client: &Client, r: &RegisterNode) -> Result<Node, AgentError> {
    let mut delay = Duration::from_millis(200);
    loop {
        match client.post::<_, Node>("/api/v1/nodes", r).await {
            Ok(n) => return Ok(n),
            Err(e @ zeitwork_client::ClientError::Unreachable { .. }) if delay < Duration::from_secs(10) => {
                tracing::warn!(error = %e, "operator unreachable; retrying registration");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn heartbeat_loop(
    client: Client,
    registrar: Client,
    registration: RegisterNode,
    mut id: String,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match client.post_empty::<Node>(&format!("/api/v1/nodes/{id}/heartbeat")).await {
            Ok(_) => {}
            Err(e) if e.status() == Some(404) => {
                // The operator forgot this node (deleted); register again.
                match registrar.post::<_, Node>("/api/v1/nodes", &registration).await {
                    Ok(n) => id = n.id,
                    Err(e) => tracing::warn!(error = %e, "re-registration failed"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

/// This node's end of the tunnel to other nodes, and what registration says
/// of it; none when private networks or the tunnel are off, or the device
/// cannot be made (then the instances reach the members on this node only).
async fn start_tunnel(
    config: &NodeAgentConfig,
    advertise: &str,
) -> Option<(zeitwork_api_types::NodeTunnel, Arc<tunnel::Tunnel>)> {
    if config.dns_port == 0 || config.tunnel_port == 0 {
        return None;
    }
    let endpoint = match &config.tunnel_endpoint {
        Some(e) => e.clone(),
        None => {
            match tunnel_endpoint_of(advertise, config.tunnel_port) {
                Some(e) => e,
                None => {
                    tracing::warn!(advertise, "no tunnel to other nodes: set tunnel_endpoint (IPv4:port), the agent's address is no IPv4 address");
                    return None;
                }
            }
        }
    };
    let dir = config.data_dir.clone();
    let (name, port) = (zeitwork_runtime::net::tunnel_interface(config.instance_range), config.tunnel_port);
    let started = tokio::task::spawn_blocking(move || {
        let key = tunnel::KeyPair::load_or_create(&dir)?;
        let device = tunnel::Tunnel::start(&name, port, &key)?;
        Ok::<_, tunnel::TunnelError>((key.public_key(), device))
    })
    .await;
    match started {
        Ok(Ok((public_key, device))) => {
            tracing::info!(%endpoint, %public_key, "private networks reach other nodes through the tunnel");
            Some((zeitwork_api_types::NodeTunnel { public_key, endpoint }, Arc::new(device)))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "no tunnel to other nodes; instances reach only the members on this node");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "starting the tunnel panicked");
            None
        }
    }
}

/// The tunnel endpoint by default: the IPv4 address of the agent's URL with `port`.
fn tunnel_endpoint_of(advertise: &str, port: u16) -> Option<String> {
    let rest = advertise.strip_prefix("http://").or_else(|| advertise.strip_prefix("https://"))?;
    let host_port = rest.split('/').next()?;
    let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
    let ip: Ipv4Addr = host.parse().ok()?;
    (!ip.is_unspecified()).then(|| format!("{ip}:{port}"))
}

/// Binds the instances' resolver (UDP and TCP, one port) and points their DNS
/// at it (the firewall sends their queries to the host on to its port).
async fn start_resolver(
    config: &NodeAgentConfig,
    table: instances::Table,
    stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let addr = SocketAddr::from(([0, 0, 0, 0], config.dns_port));
    let socket = tokio::net::UdpSocket::bind(addr)
        .await
        .map_err(|e| format!("cannot bind the resolver to UDP port {}: {e}", config.dns_port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot bind the resolver to TCP port {}: {e}", config.dns_port))?;
    zeitwork_runtime::net::apply_policy(config.instance_range, Some(config.dns_port))
        .await
        .map_err(|e| e.to_string())?;
    let upstreams = config.dns_upstreams.clone().unwrap_or_else(dns::host_upstreams);
    tracing::info!(port = config.dns_port, upstreams = ?upstreams, "resolver for the instances' private networks (UDP and TCP)");
    let tcp = dns::serve_tcp(listener, table.clone(), upstreams.clone(), stop.clone());
    Ok(tokio::spawn(async move {
        tokio::join!(dns::serve(socket, table, upstreams, stop), tcp);
    }))
}

/// Whether this node builds in microVMs (`build_isolation`), and what they
/// boot: the runtime's VMM and guest files and a root disk of this host's
/// buildah (written now, once per version of its files). An error when `vm`
/// is asked for and cannot work; `auto` then builds on the host.
async fn build_vm_of(
    config: &NodeAgentConfig,
    boot: Option<&(zeitwork_runtime::vm::Vmm, zeitwork_runtime::guest::GuestAssets)>,
    buildah: &std::path::Path,
) -> Result<Option<build_vm::VmBuilder>, String> {
    if !build_vm::vm_wanted(&config.build_isolation, boot.map(|b| &b.0))? {
        tracing::info!(requested = %config.build_isolation, "builds run on this host (buildah in user namespaces)");
        return Ok(None);
    }
    let Some((vmm, assets)) = boot.cloned() else { return Ok(None) };
    let (dir, tool) = (config.data_dir.join("builds"), buildah.to_owned());
    let root = tokio::task::spawn_blocking(move || {
        zeitwork_runtime::buildvm::clean_leftovers(&dir.join("vms"));
        build_vm::prepare_root(&dir, &tool)
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match root {
        Ok(root) => {
            tracing::info!(vmm = vmm.name(), accel = %vmm.accel(), root = %root.display(), "builds run in microVMs");
            Ok(Some(build_vm::VmBuilder { vmm, assets, root }))
        }
        Err(e) if config.build_isolation == "auto" => {
            tracing::warn!(error = %e, "build VMs cannot work here; builds run on this host");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tunnel_endpoint_defaults_to_the_agents_address() {
        assert_eq!(tunnel_endpoint_of("http://10.0.0.5:8081", 51820).as_deref(), Some("10.0.0.5:51820"));
        assert_eq!(tunnel_endpoint_of("https://10.0.0.5/", 4000).as_deref(), Some("10.0.0.5:4000"));
        assert_eq!(tunnel_endpoint_of("http://node-1.example:8081", 51820), None);
        assert_eq!(tunnel_endpoint_of("http://[fd00::1]:8081", 51820), None);
        let config = NodeAgentConfig {
            token: Some("a token".into()),
            tunnel_endpoint: Some("node-1:51820".into()),
            ..Default::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("tunnel_endpoint"));
    }

    #[test]
    fn the_instance_range_is_a_whole_slash_16() {
        let config = |range: [u8; 4]| NodeAgentConfig {
            token: Some("a token".into()),
            instance_range: range.into(),
            ..Default::default()
        };
        let e = config([10, 242, 128, 0]).validate().unwrap_err().to_string();
        assert!(e.contains("instance_range") && e.contains("10.242.128.0"), "{e}");
        let other = config([10, 242, 0, 0]).validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(!other.contains("instance_range"), "{other}");
    }

    #[test]
    fn vmm_users_and_user_namespaces_are_checked() {
        let base = NodeAgentConfig { token: Some("a token".into()), ..Default::default() };
        let fails = |c: NodeAgentConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(fails(base.clone()), "", "the defaults are valid");
        let user = base.vmm_user().expect("QEMU is unprivileged by default");
        assert_eq!(user.uid, 900_000);
        assert!(fails(NodeAgentConfig { vmm_uid: 0, ..base.clone() }).is_empty(), "0 runs QEMU as root");
        assert_eq!(NodeAgentConfig { vmm_uid: 0, ..base.clone() }.vmm_user(), None);
        assert!(fails(NodeAgentConfig { vmm_uid: 10, ..base.clone() }).contains("vmm_uid"));
        assert!(fails(NodeAgentConfig { vmm_gid: Some(0), ..base.clone() }).contains("vmm_gid"));
        let overlap = NodeAgentConfig { vmm_uid: 1_000_000_500, ..base.clone() };
        assert!(fails(overlap).contains("overlap"));
        assert!(fails(NodeAgentConfig { userns_base: 4_000_000_000, ..base.clone() }).contains("userns_base"));
        assert!(fails(NodeAgentConfig { userns_base: 0, ..base.clone() }).is_empty(), "0 turns the remap off");
        assert!(fails(NodeAgentConfig { instance_disk_mib: 4, ..base.clone() }).contains("instance_disk_mib"));
        assert!(fails(NodeAgentConfig { instance_disk_mib: 0, ..base }).is_empty(), "0 turns the quota off");
    }

    #[test]
    fn build_isolation_is_checked() {
        let base = NodeAgentConfig { token: Some("a token".into()), ..Default::default() };
        let fails = |c: NodeAgentConfig| c.validate().err().map(|e| e.to_string()).unwrap_or_default();
        for ok in ["auto", "vm", "host"] {
            assert_eq!(fails(NodeAgentConfig { build_isolation: ok.into(), ..base.clone() }), "", "{ok}");
        }
        let e = fails(NodeAgentConfig { build_isolation: "chroot".into(), ..base.clone() });
        assert!(e.contains("build_isolation") && e.contains("\"chroot\""), "{e}");
        let containers = NodeAgentConfig { build_isolation: "vm".into(), runtime: "container".into(), ..base.clone() };
        assert!(fails(containers).contains("build_isolation"));
        let host = NodeAgentConfig { build_isolation: "host".into(), runtime: "container".into(), ..base };
        assert_eq!(fails(host), "");
    }
}
