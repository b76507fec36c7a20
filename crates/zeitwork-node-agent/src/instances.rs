//! Converging the node's instances to the operator's assignments: pull and
//! start what is assigned, wait for readiness, report every status change,
//! restart crashed instances with backoff, stop what is no longer assigned.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{watch, RwLock};
use zeitwork_api_types::{Assignment, InstanceStatus};
use zeitwork_client::Client;
use zeitwork_image::ImageStore;
use zeitwork_runtime::net::{EgressAllow, ProjectNetworks};
use zeitwork_runtime::AnyRuntime;
use zeitwork_runtime::{InstanceSpec, InstanceState, Runtime};

use crate::sweep::InUse;

/// Crashes within [`CRASH_WINDOW`] after which an instance is reported as a crash loop.
pub const CRASH_LOOP: u32 = 5;
pub const CRASH_WINDOW: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct Local {
    pub assignment: Assignment,
    pub address: Option<SocketAddr>,
    pub ready: bool,
    /// Manifest digest of its image once pulled (kept by the image cache's GC).
    pub image_digest: Option<String>,
    crashes: Vec<Instant>,
    failed: bool,
    /// Which start this entry is: a start that finds another generation in
    /// the table was overtaken (the instance left and came back meanwhile).
    generation: u64,
}

impl Local {
    /// An instance as the table holds it once it runs at `address` (for
    /// tests and tools that build a table by hand).
    pub fn running(assignment: Assignment, address: SocketAddr) -> Self {
        Local { address: Some(address), ready: true, ..Local::starting(assignment, Vec::new()) }
    }

    /// An instance about to be (re)started, with its crash history.
    pub(crate) fn starting(assignment: Assignment, crashes: Vec<Instant>) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Local { assignment, address: None, ready: false, image_digest: None, crashes, failed: false, generation }
    }
}

/// Instances of this node by id, shared with the forwarder.
pub type Table = Arc<RwLock<HashMap<String, Local>>>;

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub health_path: String,
    pub start_timeout: Duration,
    pub stop_grace: Duration,
    pub every: Duration,
    /// How often a ready instance is probed again.
    pub liveness_every: Duration,
    /// Failed probes in a row after which it is reported unhealthy.
    pub liveness_failures: u32,
    /// Bytes the image cache may hold; unused images beyond it are removed.
    pub image_cache_bytes: u64,
    /// Where instance logs are also sent (syslog), to name each instance's app.
    pub forward: Option<Arc<zeitwork_telemetry::drain::Forwarder>>,
    /// The drains of the instances' organisations.
    pub org_drains: Arc<crate::drains::OrgDrains>,
    /// The instance range whose firewall carries the private project networks,
    /// when this node serves them (its resolver runs).
    pub private_networks: Option<std::net::Ipv4Addr>,
    /// The addresses of the host names in egress allow-lists ([`crate::egress`]).
    pub egress_names: crate::egress::Resolved,
    /// Set when sleeping deployments' VMs are saved to snapshots and woken from them.
    pub snapshots: Option<Snapshots>,
    /// How long instances take from start to ready.
    pub boot: BootTimes,
    /// The tunnel to other nodes, when this node has one: its peers and
    /// routes follow the members of its instances' networks.
    pub tunnel: Option<Arc<crate::tunnel::Tunnel>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct BootLabels {
    runtime: &'static str,
    /// `boot` (a new container or microVM) or `snapshot` (a microVM restored).
    from: &'static str,
}

/// `instance_boot_seconds{runtime, from}`: from the moment an instance is
/// started (after its image is pulled and its release command ran) until it
/// first answers its health check.
#[derive(Debug, Clone)]
pub struct BootTimes(
    prometheus_client::metrics::family::Family<BootLabels, prometheus_client::metrics::histogram::Histogram>,
);

impl BootTimes {
    pub fn new(metrics: &zeitwork_telemetry::HttpMetrics) -> Self {
        let b = BootTimes(prometheus_client::metrics::family::Family::new_with_constructor(|| {
            prometheus_client::metrics::histogram::Histogram::new([
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ])
        }));
        metrics.with_registry(|r| {
            r.register(
                "instance_boot_seconds",
                "Time from an instance's start to its first passed health check, by runtime and start (boot, snapshot)",
                b.0.clone(),
            )
        });
        b
    }

    fn observe(&self, runtime: &'static str, from: &'static str, took: Duration) {
        self.0.get_or_create(&BootLabels { runtime, from }).observe(took.as_secs_f64());
    }
}

/// VM snapshots for wake: counted, as Prometheus sees them.
#[derive(Debug, Clone)]
pub struct Snapshots {
    taken: Counter,
    restored: Counter,
    restore_failures: Counter,
}

type Counter = prometheus_client::metrics::counter::Counter<u64>;

/// How often the node drops snapshots of deployments that no longer sleep (woken elsewhere, retired).
pub const SNAPSHOT_SYNC_EVERY: Duration = Duration::from_secs(5);

impl Snapshots {
    pub fn new(metrics: &zeitwork_telemetry::HttpMetrics) -> Self {
        let s =
            Snapshots { taken: Counter::default(), restored: Counter::default(), restore_failures: Counter::default() };
        metrics.with_registry(|r| {
            r.register("vm_snapshots_taken", "Sleeping deployments' microVMs saved to a snapshot", s.taken.clone());
            r.register("vm_snapshot_restores", "Instances woken from a snapshot instead of a boot", s.restored.clone());
            r.register(
                "vm_snapshot_restore_failures",
                "Snapshots that could not be restored (the instance booted instead)",
                s.restore_failures.clone(),
            );
        });
        s
    }
}

/// The deployments whose snapshots this node keeps (sleeping ones that ran here).
async fn sleeping_here(client: &Client, node: &str) -> Option<Vec<String>> {
    match client.get::<Vec<String>>(&format!("/api/v1/nodes/{node}/snapshots")).await {
        Ok(list) => Some(list),
        Err(e) => {
            tracing::warn!(error = %e, "cannot ask which deployments sleep; snapshots are left as they are");
            None
        }
    }
}

/// Removes the snapshots of deployments that no longer sleep.
async fn sync_snapshots(client: &Client, runtime: &AnyRuntime, table: &Table, node: &str) {
    // Keys read before the question: a snapshot taken meanwhile is of a
    // deployment that already slept, and the answer names it.
    let keys = runtime.snapshot_keys();
    if keys.is_empty() {
        return;
    }
    let Some(sleeping) = sleeping_here(client, node).await else { return };
    for key in keys {
        let waking_here = table.read().await.values().any(|l| l.assignment.deployment == key);
        if !sleeping.contains(&key) && !waking_here {
            tracing::info!(deployment = %key, "removing the VM snapshot of a deployment that no longer sleeps here");
            runtime.discard_snapshot(&key).await;
        }
    }
}

/// Images used within this long are never collected (a deploy may be about to start on one).
const GC_MIN_AGE: Duration = Duration::from_secs(300);
const GC_EVERY: Duration = Duration::from_secs(60);

async fn report(
    client: &Client,
    id: &str,
    status: InstanceStatus,
    address: Option<SocketAddr>,
    code: Option<i32>,
    reason: Option<String>,
) {
    let body =
        json!({"status": status, "address": address.map(|a| a.to_string()), "exit_code": code, "reason": reason});
    if let Err(e) = client.put::<_, serde_json::Value>(&format!("/api/v1/instances/{id}/status"), &body).await {
        tracing::warn!(instance = %id, error = %e, "cannot report instance status");
    }
}

/// Readiness: HTTP GET on the health path answers (any status below 500), or at least a TCP connect.
pub async fn probe(addr: SocketAddr, path: &str) -> bool {
    // One client for every probe: readiness probes run up to every 100 ms per starting instance.
    static HTTP: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let http = HTTP.get_or_init(|| {
        reqwest::Client::builder().timeout(Duration::from_secs(2)).pool_max_idle_per_host(0).build().unwrap_or_default()
    });
    if let Ok(r) = http.get(format!("http://{addr}{path}")).send().await {
        return r.status().as_u16() < 500;
    }
    tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await.is_ok_and(|r| r.is_ok())
}

async fn bring_up(
    client: Client,
    images: Arc<ImageStore>,
    runtime: Arc<AnyRuntime>,
    table: Table,
    a: Assignment,
    s: Settings,
    generation: u64,
) {
    let id = a.instance.clone();
    // A delayed restart may have been overtaken: the instance left this node and
    // came back, and another start owns it now.
    let current = |table: &HashMap<String, Local>| table.get(&id).is_some_and(|l| l.generation == generation);
    if !current(&*table.read().await) {
        return;
    }
    report(&client, &id, InstanceStatus::Starting, None, None, None).await;
    if let Some(password) = &a.pull_credential {
        if let Ok(r) = zeitwork_image::Reference::parse(&a.image) {
            images.client.grant(&r.registry, &r.repository, ("zeitwork".into(), password.clone()));
        }
    }
    let image = match images.prepare(&a.image).await {
        Ok(i) => i,
        Err(e) => {
            report(&client, &id, InstanceStatus::Failed, None, None, Some(format!("image {}: {e}", a.image))).await;
            mark_failed(&table, &id).await;
            return;
        }
    };
    if let Some(l) = table.write().await.get_mut(&id) {
        l.image_digest = Some(image.manifest_digest.clone());
    }
    // The VM drivers boot the image as an ext4 disk (built once per image).
    let disk = if runtime.wants_disk() {
        match images.ext4(&image).await {
            Ok(d) => Some(d),
            Err(e) => {
                report(
                    &client,
                    &id,
                    InstanceStatus::Failed,
                    None,
                    None,
                    Some(format!("image {} as a disk: {e}", a.image)),
                )
                .await;
                mark_failed(&table, &id).await;
                return;
            }
        }
    } else {
        None
    };
    let spec = InstanceSpec {
        id: id.clone(),
        rootfs: image.rootfs.clone(),
        image: image.config.clone(),
        env: a.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        port: a.port,
        vcpu: a.resources.vcpu,
        memory_mib: a.resources.memory,
        disk,
        dns_search: (s.private_networks.is_some() && a.network.is_some()).then(|| format!("{}.internal", a.project)),
    };
    if !current(&*table.read().await) {
        return;
    }
    if let Some(command) = &a.release_command {
        let (t, still) = (&table, &current);
        match release(&runtime, &spec, command, move || async move { still(&*t.read().await) }).await {
            Release::Done => {}
            Release::Overtaken => return,
            Release::Failed(reason) => {
                report(&client, &id, InstanceStatus::Failed, None, None, Some(reason)).await;
                mark_failed(&table, &id).await;
                return;
            }
        }
        if !current(&*table.read().await) {
            return;
        }
    }
    let boot_began = Instant::now();
    let restored = match &s.snapshots {
        Some(counts) if runtime.snapshot_keys().contains(&a.deployment) => {
            match runtime.restore(&spec, &a.deployment).await {
                Ok(r) => {
                    counts.restored.inc();
                    tracing::info!(instance = %id, deployment = %a.deployment, "woken from a VM snapshot");
                    Some(r)
                }
                Err(e) => {
                    counts.restore_failures.inc();
                    tracing::warn!(instance = %id, deployment = %a.deployment, error = %e, "the VM snapshot could not be restored; booting instead");
                    None
                }
            }
        }
        _ => None,
    };
    let from = if restored.is_some() { "snapshot" } else { "boot" };
    let started = match restored {
        Some(r) => Ok(r),
        None => runtime.start(&spec).await,
    };
    let running = match started {
        Ok(r) => r,
        Err(e) => {
            report(&client, &id, InstanceStatus::Failed, None, None, Some(format!("start: {e}"))).await;
            mark_failed(&table, &id).await;
            return;
        }
    };
    if let Some(l) = table.write().await.get_mut(&id) {
        l.address = Some(running.address);
    }
    let deadline = Instant::now() + s.start_timeout;
    // Most apps listen within milliseconds of starting: probe often at first,
    // so readiness is reported the moment it is there, then back off to 100 ms.
    let mut pause = Duration::from_millis(2);
    loop {
        if let Ok(InstanceState::Exited(e)) = runtime.state(&id).await {
            report(
                &client,
                &id,
                InstanceStatus::Exited,
                Some(running.address),
                e.code,
                Some(format!("{} before becoming ready", e.reason)),
            )
            .await;
            return;
        }
        if probe(running.address, &s.health_path).await {
            break;
        }
        if Instant::now() > deadline {
            let mut reason =
                format!("the app did not answer on port {} within {} s", a.port, s.start_timeout.as_secs());
            if let Some(console) = runtime.diagnose(&id).await {
                reason.push_str(&format!("; last console lines:\n{console}"));
            }
            if let Err(e) = runtime.stop(&id, s.stop_grace).await {
                tracing::warn!(instance = %id, error = %e, "an instance that never became ready did not stop");
            }
            report(&client, &id, InstanceStatus::Failed, Some(running.address), None, Some(reason)).await;
            mark_failed(&table, &id).await;
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
    s.boot.observe(runtime.name(), from, boot_began.elapsed());
    if let Some(l) = table.write().await.get_mut(&id) {
        l.ready = true;
    }
    report(&client, &id, InstanceStatus::Ready, Some(running.address), None, None).await;
    tracing::info!(instance = %id, address = %running.address, "instance ready");
    tokio::spawn(liveness(client, runtime, table, id, running.address, s));
}

/// How a release command ended.
#[derive(Debug)]
enum Release {
    Done,
    /// The instance left this node (its deployment failed or was stopped) meanwhile.
    Overtaken,
    /// Why the deployment fails, with the tail of the command's output.
    Failed(String),
}

/// Lines of a failed release command's output kept in the deployment's reason.
const RELEASE_TAIL_LINES: usize = 20;

/// Runs `command` once in the instance's image, under the instance's own id
/// (so its output is part of the deployment's logs), before the app starts.
async fn release<F, Fut>(runtime: &AnyRuntime, spec: &InstanceSpec, command: &str, current: F) -> Release
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut one_off = spec.clone();
    one_off.image.entrypoint = vec!["/bin/sh".into(), "-c".into()];
    one_off.image.cmd = vec![command.to_owned()];
    let id = spec.id.clone();
    tracing::info!(instance = %id, "running the release command");
    if let Err(e) = runtime.start(&one_off).await {
        return Release::Failed(format!("release command: cannot start it: {e}"));
    }
    let exit = loop {
        match runtime.state(&id).await {
            Ok(InstanceState::Exited(e)) => break e,
            Ok(_) if current().await => tokio::time::sleep(Duration::from_millis(200)).await,
            Ok(_) => {
                if let Err(e) = runtime.destroy(&id).await {
                    tracing::warn!(instance = %id, error = %e, "cannot clean up a release command left behind");
                }
                return Release::Overtaken;
            }
            Err(_) => return Release::Overtaken,
        }
    };
    let output = runtime.logs(&id).await.unwrap_or_default();
    if let Err(e) = runtime.destroy(&id).await {
        tracing::warn!(instance = %id, error = %e, "cannot clean up after the release command");
    }
    if exit.code == Some(0) {
        tracing::info!(instance = %id, "release command succeeded");
        return Release::Done;
    }
    let tail: Vec<&str> = output.iter().rev().take(RELEASE_TAIL_LINES).map(|l| l.line.as_str()).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let mut reason = format!("release command failed ({})", exit.reason);
    if !tail.is_empty() {
        reason.push_str(&format!("; last output:\n{}", tail.join("\n")));
    }
    Release::Failed(reason)
}

/// Probes a ready instance periodically: reported unhealthy after
/// `liveness_failures` failed probes in a row, ready again when it answers.
/// Ends when the instance exits or leaves the node (the reconciler handles those).
async fn liveness(
    client: Client,
    runtime: Arc<AnyRuntime>,
    table: Table,
    id: String,
    address: SocketAddr,
    s: Settings,
) {
    let (mut failures, mut healthy) = (0u32, true);
    loop {
        tokio::time::sleep(s.liveness_every).await;
        let current = table.read().await.get(&id).is_some_and(|l| l.ready && l.address == Some(address));
        if !current || !matches!(runtime.state(&id).await, Ok(InstanceState::Running)) {
            return;
        }
        if probe(address, &s.health_path).await {
            failures = 0;
            if !healthy {
                healthy = true;
                tracing::info!(instance = %id, "instance answers again");
                report(&client, &id, InstanceStatus::Ready, Some(address), None, None).await;
            }
            continue;
        }
        failures += 1;
        if healthy && failures >= s.liveness_failures {
            healthy = false;
            let reason = format!("{failures} health checks in a row failed on {}", s.health_path);
            tracing::warn!(instance = %id, %reason, "instance unhealthy");
            report(&client, &id, InstanceStatus::Unhealthy, Some(address), None, Some(reason)).await;
        }
    }
}

async fn mark_failed(table: &Table, id: &str) {
    if let Some(l) = table.write().await.get_mut(id) {
        l.failed = true;
        l.ready = false;
    }
}

/// The reconcile loop; runs until `stop`, then stops every instance.
pub async fn run(
    client: Client,
    images: Arc<ImageStore>,
    runtime: Arc<AnyRuntime>,
    table: Table,
    s: Settings,
    in_use: Arc<InUse>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_gc = Instant::now();
    let mut last_sync = Instant::now();
    let mut networks: Option<ProjectNetworks> = None;
    let mut tunnel_peers: Option<crate::tunnel::Peers> = None;
    let (tx, mut assigned) = watch::channel::<Option<Vec<Assignment>>>(None);
    let watcher = tokio::spawn(watch_assignments(client.clone(), s.node.clone(), tx));
    loop {
        let current = assigned.borrow_and_update().clone();
        if let Some(list) = current {
            converge(&client, &images, &runtime, &table, &s, &in_use, list).await;
        }
        if let Some(base) = s.private_networks {
            let resolved = s.egress_names.read().map(|r| r.clone()).unwrap_or_default();
            let want = project_networks(&*table.read().await, &resolved);
            if networks.as_ref() != Some(&want) {
                match zeitwork_runtime::net::set_project_networks(base, &want).await {
                    Ok(()) => networks = Some(want),
                    Err(e) => tracing::error!(error = %e, "cannot update the private project networks"),
                }
            }
        }
        if s.snapshots.is_some() && last_sync.elapsed() >= SNAPSHOT_SYNC_EVERY {
            last_sync = Instant::now();
            sync_snapshots(&client, &runtime, &table, &s.node).await;
        }
        if let Some(tunnel) = &s.tunnel {
            let want = crate::tunnel::peers_of(table.read().await.values().map(|l| &l.assignment));
            if tunnel_peers.as_ref() != Some(&want) {
                let (tunnel, peers) = (tunnel.clone(), want.clone());
                match tokio::task::spawn_blocking(move || tunnel.apply(&peers)).await {
                    Ok(Ok(_)) => {
                        tracing::info!(peers = want.len(), "tunnel peers follow the private networks");
                        tunnel_peers = Some(want);
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot update the tunnel to other nodes"),
                    Err(e) => tracing::error!(error = %e, "updating the tunnel to other nodes panicked"),
                }
            }
        }
        if last_gc.elapsed() >= GC_EVERY {
            last_gc = Instant::now();
            let keep = table.read().await.values().filter_map(|l| l.image_digest.clone()).collect();
            let images = images.clone();
            let budget = s.image_cache_bytes;
            tokio::spawn(async move { images.gc(budget, &keep, GC_MIN_AGE).await });
        }
        // New assignments at once; otherwise a periodic pass notices exits.
        tokio::select! {
            _ = tokio::time::sleep(s.every) => {}
            _ = assigned.changed() => {}
            _ = stop.wait_for(|v| *v) => break,
        }
    }
    watcher.abort();
    // Stopping the agent stops its instances but keeps them assigned: they are
    // out of traffic (`stopping`) and come back when the agent starts again. If it
    // never does, the node goes down and they are placed elsewhere.
    let ids: Vec<(String, bool)> = table.read().await.iter().map(|(id, l)| (id.clone(), l.failed)).collect();
    // All at once: each may take the grace period.
    let stops = ids.into_iter().map(|(id, failed)| {
        let (client, runtime) = (client.clone(), runtime.clone());
        let grace = s.stop_grace;
        async move {
            let exit = runtime.stop(&id, grace).await.ok();
            if let Err(e) = runtime.destroy(&id).await {
                tracing::warn!(instance = %id, error = %e, "teardown at shutdown incomplete; the sweeper removes the rest at the next start");
            }
            if !failed {
                let reason = "the node agent stopped; the instance comes back when it starts again";
                report(
                    &client,
                    &id,
                    InstanceStatus::Stopping,
                    None,
                    exit.as_ref().and_then(|e| e.code),
                    Some(reason.into()),
                )
                .await;
            }
        }
    });
    futures::future::join_all(stops).await;
}

/// The private networks of the node's running instances: who is who, who
/// may talk to whom (instances of one network), and who may reach what outside
/// (host names in allow-lists by their `resolved` addresses; none yet: nothing).
pub fn project_networks(
    table: &HashMap<String, Local>,
    resolved: &HashMap<String, Vec<std::net::Ipv4Addr>>,
) -> ProjectNetworks {
    let mut n = ProjectNetworks::default();
    let mut by_network: HashMap<&str, Vec<std::net::Ipv4Addr>> = HashMap::new();
    let mut locals: Vec<_> = table.values().collect();
    locals.sort_by(|a, b| a.assignment.instance.cmp(&b.assignment.instance));
    for l in locals {
        let (Some(SocketAddr::V4(link)), Some(net)) = (l.address, &l.assignment.network) else { continue };
        let Ok(private) = net.address.parse() else { continue };
        let link = *link.ip();
        n.addresses.push((link, private));
        by_network.entry(net.prefix.as_str()).or_default().push(link);
        // Members on other nodes: reached through the tunnel, and heard from there.
        let remote =
            net.tunnel_peers.iter().flat_map(|p| &p.allowed_ips).filter_map(|a| crate::tunnel::host_address(a));
        for r in remote {
            n.peers.push((link, r));
            n.tunnel.push((r, link));
        }
        if let Some(egress) = &net.egress {
            use zeitwork_api_types::validate::EgressEntry;
            let allow = egress
                .allow
                .iter()
                .filter_map(|a| EgressEntry::parse(a).ok())
                .flat_map(|e| match e {
                    EgressEntry::Net(r) => vec![EgressAllow { addr: r.addr, prefix_len: r.prefix_len, port: r.port }],
                    EgressEntry::Host { name, port } => resolved
                        .get(&name)
                        .into_iter()
                        .flatten()
                        .map(|addr| EgressAllow { addr: *addr, prefix_len: 32, port })
                        .collect(),
                })
                .collect();
            n.egress.push((link, without_overlaps(allow)));
        }
    }
    let mut groups: Vec<_> = by_network.into_values().collect();
    groups.sort();
    for links in groups {
        for a in &links {
            n.peers.extend(links.iter().filter(|b| *b != a).map(|b| (*a, *b)));
        }
    }
    n
}

/// The entries no other entry (with the same port) already covers: the
/// firewall's interval sets refuse overlapping elements, and a name may
/// resolve to an address a block of the list holds.
fn without_overlaps(mut allow: Vec<EgressAllow>) -> Vec<EgressAllow> {
    let covers = |b: &EgressAllow, a: &EgressAllow| {
        let mask = if b.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(b.prefix_len)) };
        b.port == a.port && b.prefix_len <= a.prefix_len && u32::from(a.addr) & mask == u32::from(b.addr)
    };
    allow.sort_by_key(|a| (a.prefix_len, a.addr, a.port));
    allow.dedup();
    let mut kept: Vec<EgressAllow> = Vec::with_capacity(allow.len());
    for a in allow {
        // Wider blocks come first, so a covering entry is already kept.
        if !kept.iter().any(|b| covers(b, &a)) {
            kept.push(a);
        }
    }
    kept
}

/// Long-polls this node's assignments and publishes each new set.
async fn watch_assignments(client: Client, node: String, tx: watch::Sender<Option<Vec<Assignment>>>) {
    let mut version: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let path = match &version {
            Some(v) => format!("/api/v1/nodes/{node}/assignments?version={v}&timeout=25"),
            None => format!("/api/v1/nodes/{node}/assignments"),
        };
        match client.get_if_changed::<Vec<Assignment>>(&path).await {
            // Unchanged at the poll's timeout: ask again.
            Ok((None, _)) => failures = 0,
            Ok((Some(list), headers)) => {
                failures = 0;
                version = headers.get("x-assignments-version").and_then(|v| v.to_str().ok()).map(str::to_owned);
                tx.send_replace(Some(list));
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "cannot read assignments; keeping instances as they are");
                }
                // A busy operator (503) read nothing: the version held stays valid.
                if e.status() != Some(503) {
                    version = None;
                }
                tokio::time::sleep(e.retry_delay()).await;
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

async fn converge(
    client: &Client,
    images: &Arc<ImageStore>,
    runtime: &Arc<AnyRuntime>,
    table: &Table,
    s: &Settings,
    in_use: &Arc<InUse>,
    assigned: Vec<Assignment>,
) {
    let wanted: HashMap<String, Assignment> = assigned.into_iter().map(|a| (a.instance.clone(), a)).collect();
    // Stop what is no longer assigned, in the background: an app that takes
    // its whole grace period to stop must not hold up instances starting now.
    let gone: Vec<String> = table.read().await.keys().filter(|id| !wanted.contains_key(*id)).cloned().collect();
    // A ready VM of a deployment that went to sleep is saved, not stopped (one per deployment).
    let mut to_save: HashMap<String, String> = HashMap::new();
    if s.snapshots.is_some() {
        let candidates: Vec<(String, String)> = {
            let t = table.read().await;
            gone.iter()
                .filter_map(|id| {
                    t.get(id).filter(|l| l.ready && !l.failed).map(|l| (id.clone(), l.assignment.deployment.clone()))
                })
                .collect()
        };
        if !candidates.is_empty() {
            if let Some(sleeping) = sleeping_here(client, &s.node).await {
                for (id, deployment) in candidates {
                    if sleeping.contains(&deployment) && !to_save.values().any(|d| *d == deployment) {
                        to_save.insert(id, deployment);
                    }
                }
            }
        }
    }
    for id in gone {
        // Known to the sweeper until its teardown is over.
        in_use.stop_begins(&id);
        let save = to_save.remove(&id).zip(s.snapshots.clone());
        let local = table.write().await.remove(&id);
        if let Some(f) = &s.forward {
            f.forget(&id);
        }
        s.org_drains.forget(&id);
        let (client, runtime, grace, in_use) = (client.clone(), runtime.clone(), s.stop_grace, in_use.clone());
        tokio::spawn(async move {
            // An instance that already ended (and was reported so) is only cleaned up.
            let ended =
                local.is_some_and(|l| l.failed) || matches!(runtime.state(&id).await, Ok(InstanceState::Exited(_)));
            if let (Some((deployment, counts)), false) = (save, ended) {
                match runtime.snapshot(&id, &deployment).await {
                    Ok(info) => {
                        counts.taken.inc();
                        tracing::info!(instance = %id, %deployment, bytes = info.bytes, took_ms = info.took.as_millis() as u64, "the sleeping deployment's VM is saved for its wake");
                    }
                    Err(e) => {
                        tracing::warn!(instance = %id, %deployment, error = %e, "no VM snapshot; the deployment boots when it wakes")
                    }
                }
            }
            let exit = runtime.stop(&id, grace).await.ok();
            if let Err(e) = runtime.destroy(&id).await {
                tracing::warn!(instance = %id, error = %e, "cannot clean up a stopped instance; the sweeper removes what leaked");
            }
            in_use.stop_ends(&id);
            if !ended {
                let code = exit.as_ref().and_then(|e| e.code);
                let reason = "no longer assigned to this node";
                report(&client, &id, InstanceStatus::Stopped, None, code, Some(reason.into())).await;
            }
        });
    }
    for (id, a) in wanted {
        s.org_drains.route(&a);
        // The private network changes under a running instance (members come
        // and go, the egress allow-list is edited): applied, never a restart.
        if let Some(l) = table.write().await.get_mut(&id) {
            if l.assignment.network != a.network {
                l.assignment.network = a.network.clone();
            }
        }
        let known = table.read().await.get(&id).cloned();
        match known {
            None => {
                if let Some(f) = &s.forward {
                    let source = zeitwork_telemetry::drain::Source {
                        org: a.org.clone(),
                        project: a.project.clone(),
                        deployment: a.deployment.clone(),
                    };
                    f.register(&id, source);
                }
                let local = Local::starting(a.clone(), Vec::new());
                let generation = local.generation;
                {
                    // Not while a sweep runs: it could not know of this instance's objects.
                    let _adding = in_use.adding().await;
                    table.write().await.insert(id.clone(), local);
                }
                tokio::spawn(bring_up(
                    client.clone(),
                    images.clone(),
                    runtime.clone(),
                    table.clone(),
                    a,
                    s.clone(),
                    generation,
                ));
            }
            Some(l) if l.ready => {
                // Liveness: a ready instance that exited is restarted with backoff.
                if let Ok(InstanceState::Exited(e)) = runtime.state(&id).await {
                    let now = Instant::now();
                    let mut crashes: Vec<Instant> =
                        l.crashes.into_iter().filter(|t| now.duration_since(*t) < CRASH_WINDOW).collect();
                    crashes.push(now);
                    if let Err(e) = runtime.destroy(&id).await {
                        tracing::warn!(instance = %id, error = %e, "teardown of a crashed instance incomplete");
                    }
                    if crashes.len() as u32 >= CRASH_LOOP {
                        let reason = format!(
                            "crash loop: exited {} times in {} s; last: {}",
                            crashes.len(),
                            CRASH_WINDOW.as_secs(),
                            e.reason
                        );
                        report(client, &id, InstanceStatus::Failed, None, e.code, Some(reason)).await;
                        if let Some(l) = table.write().await.get_mut(&id) {
                            l.failed = true;
                            l.ready = false;
                        }
                        continue;
                    }
                    let backoff = Duration::from_millis(250 * (1 << crashes.len().min(6)));
                    // Reported as starting again, not exited: an exited instance is no longer
                    // assigned, and the restart would race its own removal.
                    let reason = format!("{}; restarting in {} ms", e.reason, backoff.as_millis());
                    report(client, &id, InstanceStatus::Starting, None, e.code, Some(reason)).await;
                    let local = Local::starting(a.clone(), crashes);
                    let generation = local.generation;
                    table.write().await.insert(id.clone(), local);
                    let (client, images, runtime, table, s) =
                        (client.clone(), images.clone(), runtime.clone(), table.clone(), s.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(backoff).await;
                        bring_up(client, images, runtime, table, a, s, generation).await;
                    });
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// An instance at link address 10.88.0.2 whose project allows `allow`.
    fn table(allow: &[&str]) -> HashMap<String, Local> {
        let assignment: Assignment = serde_json::from_value(json!({
            "instance": "ins_a", "deployment": "web-abc1234-acme", "org": "acme", "project": "web",
            "image": "acme/web:1", "port": 8080, "resources": {"vcpu": 1, "memory": 128}, "env": {},
            "status": "ready",
            "network": {"prefix": "100.96.0.0/24", "address": "100.96.0.1", "members": [], "egress": {"allow": allow}},
        }))
        .unwrap();
        let mut local = Local::starting(assignment, Vec::new());
        local.address = Some(([10, 88, 0, 2], 8080).into());
        [("ins_a".to_owned(), local)].into()
    }

    fn allow(addr: [u8; 4], prefix_len: u8, port: Option<u16>) -> EgressAllow {
        EgressAllow { addr: Ipv4Addr::from(addr), prefix_len, port }
    }

    #[test]
    fn host_names_allow_their_resolved_addresses_without_overlaps() {
        let t = table(&["api.example.com:443", "203.0.113.0/24:443", "198.51.100.0/24"]);
        // Not resolved yet: the name allows nothing.
        let n = project_networks(&t, &HashMap::new());
        assert_eq!(n.egress[0].1, vec![allow([198, 51, 100, 0], 24, None), allow([203, 0, 113, 0], 24, Some(443))]);
        // One address inside a block of the same port (left out: the block covers
        // it), one inside a block without a port (kept: another set), one outside.
        let resolved: HashMap<String, Vec<Ipv4Addr>> = [(
            "api.example.com".to_owned(),
            vec![[203, 0, 113, 9].into(), [198, 51, 100, 9].into(), [192, 0, 2, 1].into()],
        )]
        .into();
        let n = project_networks(&t, &resolved);
        assert_eq!(
            n.egress[0].1,
            vec![
                allow([198, 51, 100, 0], 24, None),
                allow([203, 0, 113, 0], 24, Some(443)),
                allow([192, 0, 2, 1], 32, Some(443)),
                allow([198, 51, 100, 9], 32, Some(443)),
            ]
        );
    }
}
