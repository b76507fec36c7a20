//! The node agent's settings (with their defaults and checks), its errors,
//! and the data directory's permissions.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use zeitwork_api_types::Capacity;

use crate::{tunnel, userns};

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
pub(crate) fn close_data_dir(dir: &std::path::Path) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [(dir.to_owned(), 0o711), (dir.join("images"), 0o700), (dir.join("logs"), 0o700)] {
        let failed = |source| AgentError::DataDir { path: path.display().to_string(), source };
        std::fs::create_dir_all(&path).map_err(failed)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    }
    Ok(())
}

/// The gid of group `name` in `/etc/group`.
pub(crate) fn group_id(name: &str) -> Option<u32> {
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
    pub(crate) fn physical(&self) -> Capacity {
        let vcpu =
            self.vcpu.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1));
        let memory = self.memory.unwrap_or_else(host_memory_mib);
        Capacity { vcpu, memory }
    }

    /// What the scheduler may place: cores x `cpu_overcommit` vCPU, memory as is.
    pub(crate) fn capacity(&self) -> Capacity {
        let p = self.physical();
        Capacity { vcpu: p.vcpu.saturating_mul(self.cpu_overcommit), memory: p.memory }
    }
}

pub(crate) fn host_memory_mib() -> u32 {
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
