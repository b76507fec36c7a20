//! `bench/control`: the control plane at scale. 1,000 simulated nodes in 3
//! regions running 20,000 instances (written straight to the store), then:
//! the time to place and make active a deployment of 3 instances per region
//! (simulated agents report ready as soon as they see their assignment), the
//! time of one full reconcile pass, and API p99 while a load runs.
//!
//! cargo run --release -p zeitwork-bench-control -- [--nodes 1000] [--instances 20000] [--rate 200]

use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};
use zeitwork_api_types::{
    Capacity, CreateRegion, DeploymentStatus, Environment, InstanceStatus, RegisterNode, Resources,
};
use zeitwork_bench_edge::flag;
use zeitwork_client::Client;
use zeitwork_control_plane::engine::{pass, EngineConfig};
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_store::{Audit, NewDeployment, NewInstance, NewProject};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> Result<()> {
    let n_nodes = flag("--nodes", 1000) as usize;
    let n_instances = flag("--instances", 20_000) as usize;
    let rate = flag("--rate", 200).max(1);
    let dir = tempfile::tempdir()?;
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_owned(),
        // Simulated nodes do not heartbeat during the setup.
        node_timeout_secs: 3600,
        ..Default::default()
    })
    .await?;
    let store = op.store.clone();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    let audit = Audit::new("bench", "setup", "bench");

    println!("setting up {n_nodes} nodes and {n_instances} instances…");
    let t = Instant::now();
    for r in REGIONS {
        store.create_region(&CreateRegion { code: r.into(), name: r.into(), country: "ZZ".into() }, &audit).await?;
    }
    store.create_org("acme", "Acme", None, &audit).await?;
    let mut nodes = Vec::new();
    for i in 0..n_nodes {
        let r = RegisterNode {
            hostname: format!("node-{i:05}"),
            region: REGIONS[i % 3].into(),
            address: format!("http://10.0.{}.{}:8081", i / 250, i % 250),
            capacity: Capacity { vcpu: 64, memory: 262_144 },
            physical: Some(Capacity { vcpu: 16, memory: 262_144 }),
            runtime: Some("container".into()),
            runtime_detail: None,
        };
        nodes.push(store.register_node(&r, &audit).await?.0);
    }
    let project = |name: &str| NewProject {
        org: "acme".into(),
        name: name.into(),
        github_repo: None,
        branch: "main".into(),
        auto_deploy: false,
        port: 8080,
        resources: Resources { vcpu: 1, memory: 256 },
        instances_per_region: 3,
        regions: None,
        image_template: None,
        rate_limit: None,
        sleep_after_secs: 900,
        retain_deployments: 20,
        scaling: None,
        staging_branch: None,
        tag_pattern: None,
        build: Default::default(),
        auto_rollback: Default::default(),
        rollout: None,
        shadow: None,
    };
    // Existing load: deployments of 10 instances each, active.
    let per = 10;
    for d in 0..n_instances.div_ceil(per) {
        let p = store.create_project(&project(&format!("app{d:05}")), &audit).await?;
        let id = format!("app{d:05}-bench-acme");
        let new = NewDeployment {
            id: id.clone(),
            project_id: p.id.clone(),
            org: "acme".into(),
            project: p.name.clone(),
            environment: Environment::Production,
            image: "registry.example.com/acme/app:1".into(),
            commit_sha: None,
            commit_message: None,
            instances_per_region: 3,
            url: format!("http://{id}.zeitwork.localhost"),
            created_by: None,
            pull_request: None,
            release_command: None,
            migration: false,
        };
        store.create_deployment(&new, &audit).await?;
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
        }
        store.set_deployment_status(&id, DeploymentStatus::Active, None).await?;
    }
    println!("  setup took {:.1} s", t.elapsed().as_secs_f64());

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

    // API load while the deployment rolls out.
    let load = {
        let admin = admin.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let every = Duration::from_secs_f64(1.0 / f64::from(rate));
            let start = Instant::now();
            let mut next = start;
            let mut errors = 0;
            while start.elapsed() < Duration::from_secs(10) {
                next += every;
                let t = Instant::now();
                let path =
                    if lat.len() % 2 == 0 { "/api/v1/projects/acme/app00001" } else { "/api/v1/deployments?limit=20" };
                if admin.get::<Value>(path).await.is_err() {
                    errors += 1;
                }
                lat.push(t.elapsed());
                tokio::time::sleep_until(next.into()).await;
            }
            lat.sort();
            (lat[lat.len() * 99 / 100], lat.len(), errors)
        })
    };

    // A new deployment: 3 instances in each of 3 regions, agents report ready at once.
    let p = store.create_project(&project("fresh"), &audit).await?;
    let t = Instant::now();
    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": p.name, "image": "registry.example.com/acme/fresh:1"}),
        )
        .await?;
    let id = d["id"].as_str().unwrap_or_default().to_owned();
    let active = loop {
        let instances = store.list_instances(&id).await?;
        for i in instances.iter().filter(|i| i.status == InstanceStatus::Pending) {
            store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.88.0.9:8080"), None).await?;
        }
        let dep = store.get_deployment(&id).await?;
        if dep.status == DeploymentStatus::Active {
            break t.elapsed();
        }
        if dep.status == DeploymentStatus::Failed {
            anyhow::bail!("the deployment failed: {:?}", dep.reason);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let placed = store.list_instances(&id).await?.len();
    let (p99, calls, errors) = load.await?;

    println!();
    println!("control plane, {n_nodes} nodes in 3 regions, {n_instances} instances (SQLite):");
    println!("  place + activate {placed} instances (3 per region): {:>8.1} ms  (goal: < 1000 ms)", ms(active));
    println!("  one full reconcile pass:                  {:>8.1} ms  (goal: < 1000 ms)", ms(one_pass));
    println!(
        "  API p99 at {rate} req/s during the rollout:   {:>8.2} ms  (goal: < 50 ms; {calls} calls, {errors} errors)",
        ms(p99)
    );
    op.shutdown().await;
    Ok(())
}
