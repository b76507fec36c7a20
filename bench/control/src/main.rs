//! `bench/control`: the control plane at scale. Simulated nodes in 3 regions
//! running instances (written straight to the store): 1,000 / 20,000 and
//! 10,000 / 200,000 by default. Every node has a simulated agent waiting in
//! its assignment long poll (as real agents do), which reports an instance
//! ready as soon as its assignment arrives. At each scale: the time to place
//! and make active a deployment of 3 instances per region, the assignment
//! reads the waiting agents cost (idle and during the rollout), one full
//! reconcile pass, API p99 while a load runs, the process's memory, the
//! memory of an edge's copy of the whole routing table, and the time for 100
//! simulated edges, watching by deltas, to receive a rollback.
//!
//! cargo run --release -p zeitwork-bench-control -- [--nodes N --instances M] [--agents A] [--rate 1000]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{json, Value};
use zeitwork_api_types::{
    Capacity, CreateRegion, DeploymentStatus, InstanceStatus, RegisterNode, Resources, RoutingDeltas, RoutingTable,
};
use zeitwork_bench_edge::flag;
use zeitwork_client::Client;
use zeitwork_control_plane::engine::{pass, EngineConfig};
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_edge::table;
use zeitwork_store::{Audit, NewDeployment, NewInstance, NewProject};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// The operator's private range: a /8 holds a network for each of the 20,000 projects.
const PRIVATE_RANGE: &str = "10.0.0.0/8";
const PRIVATE_NETWORKS: u32 = 1 << 16;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// A project of the bench's organisation: three instances per region.
fn project(name: &str) -> NewProject {
    NewProject { instances_per_region: 3, ..NewProject::named("acme", name) }
}

#[tokio::main]
async fn main() -> Result<()> {
    // `RUST_LOG=zeitwork_control_plane::engine=debug` shows where each engine pass spends its time.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let rate = flag("--rate", 1000).max(1);
    // Two descriptors per waiting agent (its end and the operator's).
    let files = raise_open_files(65_536);
    let scales: Vec<(usize, usize)> = if std::env::args().any(|a| a == "--nodes" || a == "--instances") {
        vec![(flag("--nodes", 1000) as usize, flag("--instances", 20_000) as usize)]
    } else {
        vec![(1000, 20_000), (10_000, 200_000)]
    };
    for (n_nodes, n_instances) in scales {
        let agents = (flag("--agents", n_nodes as u32) as usize).min(n_nodes).min(files.saturating_sub(2000) / 2);
        scale(n_nodes, n_instances, agents, rate).await?;
    }
    Ok(())
}

/// Raises this process's limit of open files to `want` if it may; returns the limit.
fn raise_open_files(want: u64) -> usize {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let max = now.maximum.map_or(want, |m| m.max(want));
    if setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: Some(max) }).is_err() {
        // Not allowed above the hard limit: as far as that.
        let _ = setrlimit(Resource::Nofile, Rlimit { current: now.maximum, maximum: now.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(want) as usize
}

async fn scale(n_nodes: usize, n_instances: usize, agents: usize, rate: u32) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let audit = Audit::new("bench", "setup", "bench");
    // `--state-cache DIR` keeps the written state of each scale there and
    // starts later runs from a copy of it.
    let cache_dir = std::env::args().skip_while(|a| a != "--state-cache").nth(1).map(std::path::PathBuf::from);
    if let Some(d) = &cache_dir {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    if std::env::args().any(|a| a == "--postgres") {
        // A throwaway PostgreSQL server of this run (fsync off, as in the tests).
        let pg = zeitwork_testkit::Postgres::start()?;
        let cached = cache_dir.map(|d| d.join(format!("control-{n_nodes}-{n_instances}-v2.pgdump")));
        let url = match &cached {
            Some(c) if c.exists() => {
                println!("starting from the state cached in {}", c.display());
                let url = pg.restore("bench", c)?;
                heartbeat_all(&zeitwork_store::Store::connect(&url).await?).await?;
                // As a running database has them.
                pg.analyze("bench")?;
                url
            }
            _ => {
                let url = pg.create_database("bench")?;
                let store = zeitwork_store::Store::connect(&url).await?;
                populate(&store, n_nodes, n_instances, &audit).await?;
                store.close().await;
                if let Some(c) = &cached {
                    pg.dump("bench", c)?;
                }
                pg.analyze("bench")?;
                url
            }
        };
        return measure(dir.path(), &audit, rate, n_nodes, n_instances, agents, Some(url)).await;
    }
    let db = dir.path().join("zeitwork.db");
    let cached = cache_dir.map(|d| d.join(format!("control-{n_nodes}-{n_instances}-v2.db")));
    if let Some(c) = cached.as_ref().filter(|c| c.exists()) {
        std::fs::copy(c, &db).with_context(|| format!("copying the cached state {}", c.display()))?;
        println!("starting from the state cached in {}", c.display());
        heartbeat_all(&zeitwork_store::Store::open_sqlite(&db).await?).await?;
    } else {
        let store = zeitwork_store::Store::open_sqlite(&db).await?;
        populate(&store, n_nodes, n_instances, &audit).await?;
        store.close().await;
        if let Some(c) = &cached {
            std::fs::copy(&db, c).with_context(|| format!("caching the state in {}", c.display()))?;
        }
    }
    measure(dir.path(), &audit, rate, n_nodes, n_instances, agents, None).await
}

/// Every node heartbeats now: a cached state's nodes last did when it was
/// written, and would be marked down once that is older than the timeout.
async fn heartbeat_all(store: &zeitwork_store::Store) -> Result<()> {
    let mut page = zeitwork_store::Page::first(1000);
    loop {
        let nodes = store.list_nodes(&page).await?;
        for n in &nodes.items {
            store.node_heartbeat(&n.id).await?;
        }
        match nodes.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    store.close().await;
    Ok(())
}

/// Simulated node `i` as it registers.
fn registration(i: usize) -> RegisterNode {
    RegisterNode {
        hostname: format!("node-{i:05}"),
        region: REGIONS[i % 3].into(),
        // Loopback: nothing listens there, and nothing leaves the machine.
        address: format!("http://127.1.{}.{}:8081", i / 250, i % 250 + 1),
        capacity: Capacity { vcpu: 64, memory: 262_144 },
        physical: Some(Capacity { vcpu: 16, memory: 262_144 }),
        runtime: Some("container".into()),
        runtime_detail: None,
        tunnel: None,
    }
}

/// Writes the nodes and the running deployments before the operator starts,
/// as one would restore them.
async fn populate(store: &zeitwork_store::Store, n_nodes: usize, n_instances: usize, audit: &Audit) -> Result<()> {
    println!("setting up {n_nodes} nodes and {n_instances} instances…");
    let t = Instant::now();
    for r in REGIONS {
        store.create_region(&CreateRegion { code: r.into(), name: r.into(), country: "ZZ".into() }, audit).await?;
    }
    store.create_org("acme", "Acme", None, audit).await?;
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        nodes.push(store.register_node(&registration(i), audit).await?.0);
    }
    // Existing load: deployments of 10 instances each, active.
    let per = 10;
    for d in 0..n_instances.div_ceil(per) {
        let p = store.create_project(&project(&format!("app{d:05}")), audit).await?;
        let id = format!("app{d:05}-bench-acme");
        let mut placed = Vec::with_capacity(per);
        let new = NewDeployment::of(&p, &id, "registry.example.com/acme/app:1");
        store.create_deployment(&new, audit).await?;
        for k in 0..per {
            let node = &nodes[(d * per + k) % nodes.len()];
            let i = store
                .create_instance(&NewInstance {
                    deployment: id.clone(),
                    node: Some(node.id.clone()),
                    region: node.region.clone(),
                    resources: Resources { vcpu: 1, memory: 256 },
                    runtime: None,
                })
                .await?;
            store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.88.0.2:8080"), None).await?;
            placed.push(i.id);
        }
        store.set_deployment_status(&id, DeploymentStatus::Active, None).await?;
        // Their private addresses, as the agents' first reads hand them out.
        let net = store.project_network(&p.id, "production", PRIVATE_NETWORKS).await?;
        store.give_private_hosts(net, &placed, 254).await?;
    }
    // As the engine's sweep does: what the nodes hold kept on the nodes.
    store.fold_node_holds().await?;
    println!("  setup took {:.1} s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Places and activates a new deployment on the written state, with an API
/// load, simulated agents and 100 simulated edges; prints what it measured.
async fn measure(
    dir: &std::path::Path,
    audit: &Audit,
    rate: u32,
    n_nodes: usize,
    n_instances: usize,
    n_agents: usize,
    database_url: Option<String>,
) -> Result<()> {
    let backend = if database_url.is_some() { "PostgreSQL" } else { "SQLite" };
    let op = Operator::start(OperatorConfig {
        database_url,
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.to_owned(),
        // Simulated nodes do not heartbeat.
        node_timeout_secs: 3600,
        private_network: PRIVATE_RANGE.into(),
        max_connections_per_client: n_agents + 1000,
        // No simulated node has an agent to sample.
        usage_sample_secs: 3600,
        ..Default::default()
    })
    .await?;
    let store = op.store.clone();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    let edge_token: Value = admin
        .post("/api/v1/tokens", &json!({"name": "bench-edges", "scope": {"kind": "cluster", "role": "edge-proxy"}}))
        .await?;
    let edge = Client::new(&base, edge_token["secret"].as_str().map(str::to_owned));
    // Until the operator has built its first table.
    let table = loop {
        let t: RoutingTable = edge.get("/api/v1/routing").await?;
        if !t.routes.is_empty() {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // An edge's copy of the whole table, as the edge holds it.
    let before = rss_mib();
    let routes = table::apply(
        &table::Routes::default(),
        &table.version,
        &table.apps_domain,
        table::diff(&Default::default(), &table),
    );
    let (n_routes, apps) = (table.routes.len(), table.apps_domain.clone());
    drop(table);
    let edge_table = rss_mib() - before;
    drop(routes);

    // One full reconcile pass over that state (nothing to do: the steady-state cost).
    let config = EngineConfig { node_timeout: Duration::from_secs(3600), ..Default::default() };
    let mut passes = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        pass(&store, &config).await?;
        passes.push(t.elapsed());
    }
    passes.sort();
    let one_pass = passes[passes.len() / 2];

    // Every node's agent in its assignment long poll, as real agents wait.
    let mut nodes = Vec::with_capacity(n_nodes);
    let mut page = zeitwork_store::Page::first(1000);
    loop {
        let l = store.list_nodes(&page).await?;
        nodes.extend(l.items.into_iter().map(|n| n.id));
        match l.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    let without_agent: std::collections::HashSet<String> =
        nodes.split_off(n_agents.min(nodes.len())).into_iter().collect();
    let n_agents = nodes.len();
    // Nodes past the limit of open files have no agent: their instances are
    // reported ready from the store as soon as it announces them.
    let reporter = (!without_agent.is_empty()).then(|| tokio::spawn(report_ready(store.clone(), without_agent)));
    let connected = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let agents: Vec<_> = nodes
        .into_iter()
        .map(|node| tokio::spawn(agent(admin.clone(), store.clone(), node, connected.clone())))
        .collect();
    while connected.load(std::sync::atomic::Ordering::Relaxed) < n_agents {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first_reads = t.elapsed();
    let first_busy = op.assignments.busy.get();
    // What they cost while nothing changes.
    let hub = op.assignments.clone();
    let idle = Duration::from_secs(5);
    let reads = hub.reads.get();
    tokio::time::sleep(idle).await;
    let idle_reads = (hub.reads.get() - reads) as f64 / idle.as_secs_f64();

    // API load while the deployment rolls out.
    let load_start = Instant::now();
    let load = {
        let admin = admin.clone();
        tokio::spawn(async move {
            // Open loop: each call leaves at its time whether or not the ones
            // before it answered, and its latency counts from that time.
            let every = Duration::from_secs_f64(1.0 / f64::from(rate));
            let start = Instant::now();
            let mut due = start;
            let mut calls = tokio::task::JoinSet::new();
            while start.elapsed() < Duration::from_secs(10) {
                let path = if calls.len() % 2 == 0 {
                    "/api/v1/projects/acme/app00001"
                } else {
                    "/api/v1/deployments?limit=20"
                };
                let admin = admin.clone();
                let at = due - start;
                calls.spawn(async move {
                    let ok = admin.get::<Value>(path).await.is_ok();
                    (due.elapsed(), ok, at)
                });
                due += every;
                tokio::time::sleep_until(due.into()).await;
            }
            let (mut lat, mut errors) = (Vec::new(), 0);
            // When the calls over 50 ms were due (seconds into the load).
            let mut slow: Vec<f64> = Vec::new();
            while let Some(r) = calls.join_next().await {
                let (took, ok, at) = r.unwrap_or((Duration::MAX, false, Duration::ZERO));
                lat.push(took);
                errors += usize::from(!ok);
                if took > Duration::from_millis(50) {
                    slow.push(at.as_secs_f64());
                }
            }
            lat.sort();
            slow.sort_by(f64::total_cmp);
            let p50 = lat[lat.len() / 2];
            (lat[lat.len() * 99 / 100], p50, lat.len(), errors, slow)
        })
    };

    let p = store.create_project(&project("fresh"), audit).await?;
    let deploy = |image: &'static str| {
        let (admin, store, name) = (admin.clone(), store.clone(), p.name.clone());
        async move {
            let t = Instant::now();
            let d: Value =
                admin.post("/api/v1/deployments", &json!({"org": "acme", "project": name, "image": image})).await?;
            let id = d["id"].as_str().unwrap_or_default().to_owned();
            let mut changes = store.changes();
            loop {
                changes.mark_unchanged();
                let dep = store.get_deployment(&id).await?;
                if dep.status == DeploymentStatus::Active {
                    return Ok::<_, anyhow::Error>((id, t.elapsed()));
                }
                if dep.status == DeploymentStatus::Failed {
                    anyhow::bail!("the deployment failed: {:?}", dep.reason);
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), changes.changed()).await;
            }
        }
    };
    let mut asked = [load_start.elapsed().as_secs_f64(), 0.0];
    let (first, _) = deploy("registry.example.com/acme/fresh:1").await?;
    asked[1] = load_start.elapsed().as_secs_f64();

    let (reads, changes) = (hub.reads.get(), *store.changes().borrow());
    let (id, active) = deploy("registry.example.com/acme/fresh:2").await?;
    let (rollout_reads, rollout_changes) = (hub.reads.get() - reads, *store.changes().borrow() - changes);
    let placed = store.list_instances(&id).await?.len();
    let (p99, p50, calls, errors, slow) = load.await?;
    // 100 edges watching by deltas, each from the cursor at which the host serves the second deployment.
    let host = format!("fresh-acme.{apps}");
    // One snapshot gives the cursor every edge resumes from (edges that connect get a snapshot each).
    let start: RoutingDeltas = loop {
        let d: RoutingDeltas = edge.get("/api/v1/routing/deltas?timeout=1").await?;
        if d.routes.iter().any(|r| r.host == host && r.deployment == id) {
            break d;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut edges = Vec::new();
    for _ in 0..100 {
        let edge = edge.clone();
        let (host, first, start) = (host.clone(), first.clone(), start.cursor.clone());
        edges.push(tokio::spawn(async move {
            let mut cursor = start;
            loop {
                let path = format!("/api/v1/routing/deltas?since={}&timeout=30", zeitwork_client::encode(&cursor));
                let d: RoutingDeltas = edge.get(&path).await?;
                cursor = d.cursor;
                if d.routes.iter().any(|r| r.host == host && r.deployment == first) {
                    return Ok::<_, anyhow::Error>(Instant::now());
                }
            }
        }));
    }

    // Time for the edges to be waiting in their long polls.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A rollback to the first: the time until all 100 edges have it.
    let t = Instant::now();
    let _: Value = admin.post("/api/v1/projects/acme/fresh/rollback", &json!({"to": first})).await?;
    let answered = t.elapsed();
    let mut last = t;
    for e in edges {
        last = last.max(e.await??);
    }
    let switch = last - t;
    // A node registering again (an agent restarting): the watches it wakes.
    let reads = hub.reads.get();
    store.register_node(&registration(n_nodes / 2), audit).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reregister_reads = hub.reads.get() - reads;
    agents.iter().for_each(|a| a.abort());
    if let Some(r) = reporter {
        r.abort();
    }
    let rss = rss_mib();

    println!();
    println!("control plane, {n_nodes} nodes in 3 regions, {n_instances} instances ({backend}):");
    println!("  place + activate {placed} instances (3 per region): {:>8.1} ms  (goal: < 1000 ms)", ms(active));
    println!(
        "  agents waiting in assignment long polls: {n_agents:>8}  (their first reads took {:.1} s; {first_busy} calls answered 503 meanwhile)",
        first_reads.as_secs_f64()
    );
    println!(
        "  assignment reads while idle:              {idle_reads:>8.1}/s  (a 2 s recheck per poll would be {}/s)",
        n_agents / 2
    );
    println!(
        "  assignment reads during the rollout:      {rollout_reads:>8}  ({rollout_changes} changes announced; a read per poll per change would be {})",
        n_agents as u64 * rollout_changes
    );
    println!(
        "  assignment reads after a node registers again: {reregister_reads:>3}  (the node and those sharing a project with it)"
    );
    println!("  one full reconcile pass:                  {:>8.1} ms  (goal: < 1000 ms)", ms(one_pass));
    println!(
        "  API p99 at {rate} req/s during the rollout:  {:>8.2} ms  (goal: < 50 ms; p50 {:.2} ms; {calls} calls, {errors} errors)",
        ms(p99),
        ms(p50)
    );
    if let (Some(a), Some(b)) = (slow.first(), slow.last()) {
        println!(
            "    {} calls over 50 ms, due from {a:.2} s to {b:.2} s into the load (deployments asked at {:.2} s and {:.2} s)",
            slow.len(),
            asked[0],
            asked[1]
        );
    }
    println!("  process memory (operator and bench):      {rss:>8.1} MiB");
    println!("  edge table ({n_routes} routes):             {edge_table:>8.1} MiB  (goal: < 100 MiB)");
    println!(
        "  rollback to 100 edges by deltas:          {:>8.1} ms  (API answered after {:.1} ms; goal: < 100 ms)",
        ms(switch),
        ms(answered)
    );
    op.shutdown().await;
    Ok(())
}

/// A simulated node agent: long-polls the node's assignments and reports
/// each new instance ready the moment it is assigned; counts itself in
/// `connected` once it has its first answer.
async fn agent(
    client: Client,
    store: zeitwork_store::Store,
    node: String,
    connected: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let mut version: Option<String> = None;
    let mut told = false;
    loop {
        let path = match &version {
            Some(v) => format!("/api/v1/nodes/{node}/assignments?version={v}&timeout=25"),
            None => format!("/api/v1/nodes/{node}/assignments"),
        };
        match client.get_if_changed::<Vec<zeitwork_api_types::Assignment>>(&path).await {
            Ok((None, _)) => {}
            Ok((Some(list), headers)) => {
                if version.is_none() {
                    connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                version = headers.get("x-assignments-version").and_then(|v| v.to_str().ok()).map(str::to_owned);
                for a in list.iter().filter(|a| a.status == InstanceStatus::Pending) {
                    let _ = store
                        .set_instance_status(&a.instance, InstanceStatus::Ready, Some("10.88.0.9:8080"), None)
                        .await;
                }
            }
            // As the node agent does: asked again later, with the version held.
            Err(e) => {
                if !told {
                    eprintln!("agent of {node}: {e}");
                    told = true;
                }
                tokio::time::sleep(e.retry_delay()).await;
            }
        }
    }
}

/// Reports ready, at each change the store announces, the pending instances
/// of starting deployments placed on `nodes` (nodes without a simulated agent).
async fn report_ready(store: zeitwork_store::Store, nodes: std::collections::HashSet<String>) {
    let mut changes = store.changes();
    while changes.changed().await.is_ok() {
        let filter =
            zeitwork_store::DeploymentFilter { status: Some(DeploymentStatus::Starting), ..Default::default() };
        let Ok(d) = store.list_deployments(&filter, &zeitwork_store::Page::first(100)).await else { continue };
        for d in d.items {
            for i in store.list_instances(&d.id).await.unwrap_or_default() {
                if i.status == InstanceStatus::Pending && i.node.as_ref().is_some_and(|n| nodes.contains(n)) {
                    let _ = store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.88.0.9:8080"), None).await;
                }
            }
        }
    }
}
