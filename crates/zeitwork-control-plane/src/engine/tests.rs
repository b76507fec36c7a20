use super::*;
use zeitwork_api_types::Capacity;

fn node(id: &str, region: &str, status: NodeStatus, mem: u32, used: u32) -> Node {
    Node {
        id: id.into(),
        hostname: id.into(),
        region: region.into(),
        address: "http://x:1".into(),
        status,
        capacity: Capacity { vcpu: 8, memory: mem },
        physical: None,
        allocated: Capacity { vcpu: 0, memory: used },
        instances: 0,
        runtime: "container".into(),
        runtime_detail: None,
        last_heartbeat: None,
        created_at: chrono::Utc::now(),
        credential: None,
    }
}

const SMALL: Resources = Resources { vcpu: 1, memory: 512 };

#[test]
fn spreads_then_packs_and_skips_unusable_nodes() {
    let nodes = vec![
        node("a", "eu", NodeStatus::Ready, 4096, 0),
        node("b", "eu", NodeStatus::Ready, 4096, 2048),
        node("c", "eu", NodeStatus::Draining, 65536, 0),
        node("d", "us", NodeStatus::Ready, 65536, 0),
        node("e", "eu", NodeStatus::Down, 65536, 0),
    ];
    let picked = place(&nodes, "eu", 2, SMALL).unwrap();
    assert_eq!(picked.len(), 2);
    assert_ne!(picked[0], picked[1], "no two on one node while another has room");
    assert!(picked.iter().all(|n| n == "a" || n == "b"));
    // Three on two nodes: one node gets two.
    let picked = place(&nodes, "eu", 3, SMALL).unwrap();
    assert_eq!(picked.iter().filter(|n| *n == "a").count() + picked.iter().filter(|n| *n == "b").count(), 3);
    let err = place(&nodes, "eu", 20, SMALL).unwrap_err();
    assert!(err.contains("lacks capacity"), "{err}");
    assert!(place(&nodes, "ap", 1, SMALL).unwrap_err().contains("no ready node"));
}

/// The pass reads a deployment again only when a region is short of its
/// count, or an autoscaled one serves more than it should.
#[test]
fn only_deployments_short_of_or_beyond_their_count_need_attention() {
    let t = |region: &str, status: InstanceStatus, count: u32| InstanceTally {
        deployment: "d".into(),
        region: region.into(),
        status,
        count,
    };
    let regions = ["eu".to_owned(), "us".to_owned()];
    let settled =
        [t("eu", InstanceStatus::Ready, 2), t("us", InstanceStatus::Ready, 1), t("us", InstanceStatus::Starting, 1)];
    assert!(!needs_attention(&settled, &regions, 2, false));
    assert!(!needs_attention(&settled, &regions, 2, true));
    // Dead instances do not count; a stopping one still holds its place but does not serve.
    let short =
        [t("eu", InstanceStatus::Ready, 2), t("us", InstanceStatus::Ready, 1), t("us", InstanceStatus::Failed, 3)];
    assert!(needs_attention(&short, &regions, 2, false));
    let stopping =
        [t("eu", InstanceStatus::Ready, 2), t("us", InstanceStatus::Ready, 2), t("eu", InstanceStatus::Stopping, 1)];
    assert!(!needs_attention(&stopping, &regions, 2, true));
    // A region with none at all.
    assert!(needs_attention(&[t("eu", InstanceStatus::Ready, 2)], &regions, 2, false));
    assert!(needs_attention(&[], &regions, 1, false));
    assert!(!needs_attention(&[], &regions, 0, false));
    // Beyond the count: only an autoscaled deployment is scaled down, in any region it runs in.
    let beyond =
        [t("eu", InstanceStatus::Ready, 3), t("us", InstanceStatus::Ready, 2), t("ap", InstanceStatus::Pending, 1)];
    assert!(!needs_attention(&beyond, &regions, 2, false));
    assert!(needs_attention(&beyond, &regions, 2, true));
    let elsewhere =
        [t("eu", InstanceStatus::Ready, 2), t("us", InstanceStatus::Ready, 2), t("ap", InstanceStatus::Ready, 1)];
    assert!(!needs_attention(&elsewhere, &regions, 2, true));
    assert!(needs_attention(
        &[t("eu", InstanceStatus::Ready, 2), t("us", InstanceStatus::Ready, 2), t("ap", InstanceStatus::Ready, 3)],
        &regions,
        2,
        true
    ));
    // A project in no region: nothing to place.
    assert!(!needs_attention(&[], &[], 3, false));
}

/// A deployment whose instances keep failing stops being replaced, and says so once.
#[tokio::test]
async fn a_crash_loop_is_told_once() {
    use zeitwork_api_types::{CreateRegion, RegisterNode};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
    let a = || Audit::new("test", "test", "x");
    let region = CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() };
    store.create_region(&region, &a()).await.unwrap();
    let reg = RegisterNode {
        hostname: "n1".into(),
        region: "eu".into(),
        address: "http://127.0.0.1:1".into(),
        capacity: Capacity { vcpu: 8, memory: 8192 },
        physical: None,
        runtime: Some("container".into()),
        runtime_detail: None,
        tunnel: None,
    };
    let (n, _) = store.register_node(&reg, &a()).await.unwrap();
    store.create_org("acme", "acme", None, &a()).await.unwrap();
    let project = zeitwork_store::NewProject { resources: SMALL, ..zeitwork_store::NewProject::named("acme", "web") };
    let p = store.create_project(&project, &a()).await.unwrap();
    let new = zeitwork_store::NewDeployment::of(&p, "web-aaaaaaa-acme", "registry.example.com/web:1");
    let d = store.create_deployment(&new, &a()).await.unwrap();
    store.activate_deployment(&d.id, &a()).await.unwrap();
    let config = EngineConfig::default();
    for _ in 0..config.crash_budget {
        let i = store
            .create_instance(&NewInstance {
                deployment: d.id.clone(),
                node: Some(n.id.clone()),
                region: "eu".into(),
                resources: SMALL,
                runtime: None,
            })
            .await
            .unwrap();
        store.set_instance_status(&i.id, InstanceStatus::Failed, None, Some((Some(1), "exit 1".into()))).await.unwrap();
    }
    let d = store.get_deployment(&d.id).await.unwrap();
    let now = chrono::Utc::now();
    for _ in 0..3 {
        let out = reconcile(&store, &config, &d, 1, now).await.unwrap();
        assert!(out.stuck.as_deref().unwrap_or("").contains("not replaced"), "{:?}", out.stuck);
    }
    let filter = zeitwork_store::EventFilter { action: Some("instance.crash_loop".into()), ..Default::default() };
    let told = store.list_events(&filter, &zeitwork_store::Page::first(10)).await.unwrap().items;
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].target, d.id);
    assert_eq!(store.list_instances(&d.id).await.unwrap().len(), config.crash_budget, "nothing was placed");

    // A starting deployment whose instance fails fails, and is counted once.
    let second = zeitwork_store::NewDeployment::of(&p, "web-bbbbbbb-acme", "registry.example.com/web:1");
    let d2 = store.create_deployment(&second, &a()).await.unwrap();
    store.set_deployment_status(&d2.id, DeploymentStatus::Starting, None).await.unwrap();
    let i = store
        .create_instance(&NewInstance {
            deployment: d2.id.clone(),
            node: Some(n.id.clone()),
            region: "eu".into(),
            resources: SMALL,
            runtime: None,
        })
        .await
        .unwrap();
    store.set_instance_status(&i.id, InstanceStatus::Failed, None, Some((Some(1), "exit 1".into()))).await.unwrap();
    assert_eq!(config.outcomes.get(DeploymentStatus::Failed), 0);
    for _ in 0..2 {
        pass(&store, &config).await.unwrap();
    }
    assert_eq!(store.get_deployment(&d2.id).await.unwrap().status, DeploymentStatus::Failed);
    assert_eq!(config.outcomes.get(DeploymentStatus::Failed), 1);
}

/// A store with one region (`eu`), one node in it and a project `acme/web`
/// running one instance per region; the node and the project.
async fn one_node(dir: &std::path::Path) -> (Store, Node, zeitwork_api_types::Project) {
    use zeitwork_api_types::{CreateRegion, RegisterNode};
    let store = Store::open_sqlite(&dir.join("z.db")).await.unwrap();
    let a = Audit::new("test", "test", "x");
    let region = CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() };
    store.create_region(&region, &a).await.unwrap();
    let reg = RegisterNode {
        hostname: "n1".into(),
        region: "eu".into(),
        address: "http://127.0.0.1:1".into(),
        capacity: Capacity { vcpu: 8, memory: 8192 },
        physical: None,
        runtime: Some("container".into()),
        runtime_detail: None,
        tunnel: None,
    };
    let (n, _) = store.register_node(&reg, &a).await.unwrap();
    store.create_org("acme", "acme", None, &a).await.unwrap();
    let project = zeitwork_store::NewProject { resources: SMALL, ..zeitwork_store::NewProject::named("acme", "web") };
    let p = store.create_project(&project, &a).await.unwrap();
    (store, n, p)
}

/// A new production deployment of `p` acted on as the engine would: placed
/// (one instance), not moved while its instance is not ready, active once the
/// report that completes it comes.
async fn placed_and_active(
    store: &Store,
    config: &EngineConfig,
    p: &zeitwork_api_types::Project,
) -> (zeitwork_api_types::Deployment, Vec<zeitwork_api_types::Instance>) {
    let a = Audit::new("test", "test", "x");
    let id = format!("{}-new-acme", p.name);
    let d =
        store.create_deployment(&deployment_of(p, &id, zeitwork_api_types::Environment::Production), &a).await.unwrap();
    assert!(act_on(store, config, std::slice::from_ref(&d.id)).await.unwrap());
    assert_eq!(store.get_deployment(&d.id).await.unwrap().status, DeploymentStatus::Starting);
    let placed = store.list_instances(&d.id).await.unwrap();
    assert_eq!(placed.len(), 1, "one per region");
    // Not all ready yet: nothing moves; the report that completes it activates it.
    assert!(!act_on(store, config, std::slice::from_ref(&d.id)).await.unwrap());
    store.set_instance_status(&placed[0].id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
    assert!(act_on(store, config, std::slice::from_ref(&d.id)).await.unwrap());
    assert_eq!(store.get_deployment(&d.id).await.unwrap().status, DeploymentStatus::Active);
    (d, placed)
}

fn deployment_of(
    p: &zeitwork_api_types::Project,
    id: &str,
    env: zeitwork_api_types::Environment,
) -> zeitwork_store::NewDeployment {
    zeitwork_store::NewDeployment {
        environment: env,
        ..zeitwork_store::NewDeployment::of(p, id, "registry.example.com/web:1")
    }
}

/// The engine acts on a change for the deployments it names, as a full pass
/// would, and on nothing else: a new deployment is placed, the ready report
/// that completes it makes it active, a running deployment that lost its
/// instance gets another; a deployment no change named waits for the pass.
#[tokio::test]
async fn a_change_moves_the_deployments_it_names_and_no_other() {
    use zeitwork_api_types::Environment;
    let dir = tempfile::tempdir().unwrap();
    let (store, n, p) = one_node(dir.path()).await;
    let a = Audit::new("test", "test", "x");
    let config = EngineConfig::default();
    // Another environment's deployment runs without its instance: only a full pass looks at it.
    let idle = store.create_deployment(&deployment_of(&p, "web-idle-acme", Environment::Staging), &a).await.unwrap();
    store.activate_deployment(&idle.id, &a).await.unwrap();

    let (d, placed) = placed_and_active(&store, &config, &p).await;
    assert_eq!(placed[0].node.as_deref(), Some(n.id.as_str()));
    assert!(store.list_instances(&idle.id).await.unwrap().is_empty(), "not named, not touched");
    assert_eq!(config.outcomes.get(DeploymentStatus::Active), 1);
    // Acting again changes nothing.
    assert!(!act_on(&store, &config, std::slice::from_ref(&d.id)).await.unwrap());

    // Its instance is lost: the report places another one.
    store
        .set_instance_status(&placed[0].id, InstanceStatus::Exited, None, Some((Some(137), "killed".into())))
        .await
        .unwrap();
    assert!(act_on(&store, &config, std::slice::from_ref(&d.id)).await.unwrap());
    let live: Vec<_> = store
        .list_instances(&d.id)
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.status == InstanceStatus::Pending)
        .collect();
    assert_eq!(live.len(), 1, "a replacement");

    // A deployment that is gone, or settled, is skipped.
    assert!(!act_on(&store, &config, &["web-gone-acme".to_owned()]).await.unwrap());
    assert!(store.list_instances(&idle.id).await.unwrap().is_empty());
    // The full pass finds what no change named.
    assert!(pass(&store, &config).await.unwrap());
    assert_eq!(store.list_instances(&idle.id).await.unwrap().len(), 1);
}

/// Between a sweep's reads the engine acts on the deployments announced
/// meanwhile; a change that asks for more is left, unseen, for its loop.
#[tokio::test]
async fn a_sweep_acts_between_its_reads_on_what_was_announced() {
    use zeitwork_api_types::Environment;
    let dir = tempfile::tempdir().unwrap();
    let (store, _, p) = one_node(dir.path()).await;
    let a = Audit::new("test", "test", "x");
    let config = EngineConfig::default();
    let mut seen = *store.changes().borrow();
    let d = store.create_deployment(&deployment_of(&p, "web-new-acme", Environment::Production), &a).await.unwrap();
    let mut between = Between { store: &store, config: &config, seen: &mut seen };
    assert!(between.act().await.unwrap());
    assert_eq!(store.get_deployment(&d.id).await.unwrap().status, DeploymentStatus::Starting);
    assert!(!between.act().await.unwrap(), "nothing announced since");
    let acted = seen;
    assert_eq!(acted, *store.changes().borrow());

    // A node's change and a deployment announced with it: both left for the loop.
    let d2 = store.create_deployment(&deployment_of(&p, "web-two-acme", Environment::Staging), &a).await.unwrap();
    store.drain_node(&store.nodes_for_placement().await.unwrap()[0].id, &a).await.unwrap();
    let mut between = Between { store: &store, config: &config, seen: &mut seen };
    assert!(!between.act().await.unwrap());
    assert_eq!(seen, acted, "not taken from the loop");
    assert_eq!(store.get_deployment(&d2.id).await.unwrap().status, DeploymentStatus::Pending);
    assert_eq!(
        Work::of(store.changes_since(seen).1),
        Work::Changes { deployments: vec![d2.id.clone()], projects: vec![], nodes: true }
    );
}

/// What a wake-up asks for: the deployments announced (each once), a full
/// pass for anything else or for announcements the store no longer knows.
#[test]
fn announcements_name_the_work() {
    use zeitwork_store::Change;
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(Work::of(Some(vec![])), Work::Nothing);
    assert_eq!(
        Work::of(Some(vec![Change::Deployments(ids(&["a", "b"])), Change::Deployments(ids(&["b", "c"]))])),
        Work::Changes { deployments: ids(&["a", "b", "c"]), projects: vec![], nodes: false }
    );
    assert_eq!(
        Work::of(Some(vec![Change::Nodes(ids(&["n"])), Change::Deployments(ids(&["a"])), Change::Nodes(vec![])])),
        Work::Changes { deployments: ids(&["a"]), projects: vec![], nodes: true }
    );
    assert_eq!(
        Work::of(Some(vec![Change::Nodes(vec![])])),
        Work::Changes { deployments: vec![], projects: vec![], nodes: true }
    );
    assert_eq!(Work::of(Some(vec![Change::Deployments(ids(&["a"])), Change::Anything])), Work::Full);
    assert_eq!(
        Work::of(Some(vec![
            Change::Projects(ids(&["p", "q"])),
            Change::Deployments(ids(&["a"])),
            Change::Projects(ids(&["p"]))
        ])),
        Work::Changes { deployments: ids(&["a"]), projects: ids(&["p", "q"]), nodes: false }
    );
    assert_eq!(Work::of(None), Work::Full);
}

/// Polls `what` every 20 ms until it returns `Some`; panics after 20 s.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(name: &str, mut what: impl FnMut() -> F) -> T {
    for _ in 0..1000 {
        if let Some(v) = what().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{name} did not happen within 20 s");
}

/// Two engines on one store both hear of a new deployment and of the ready
/// report that completes it; only the lease holder acts, at once and with no
/// tick to wait for: the deployment is placed once and goes live.
#[tokio::test]
async fn two_engines_hearing_one_change_act_once_without_a_tick() {
    use zeitwork_api_types::Environment;
    let dir = tempfile::tempdir().unwrap();
    let (store, _n, p) = one_node(dir.path()).await;
    let (stop_tx, stop) = watch::channel(false);
    // No tick within the test: only the first full pass, then changes alone.
    let config = EngineConfig { tick: Duration::from_secs(3600), ..Default::default() };
    let mut engines = Vec::new();
    for holder in ["operator-a", "operator-b"] {
        engines.push(tokio::spawn(run(
            store.clone(),
            config.clone(),
            holder.to_owned(),
            || {},
            std::sync::Arc::new(tokio::sync::Notify::new()),
            EngineGauges::default(),
            stop.clone(),
        )));
    }
    let leader = eventually("an engine lease", || async { store.lease(ENGINE_LEASE).await.unwrap() }).await.0;
    assert!(leader == "operator-a" || leader == "operator-b", "{leader}");

    let a = Audit::new("test", "test", "x");
    let d = store.create_deployment(&deployment_of(&p, "web-once-acme", Environment::Production), &a).await.unwrap();
    eventually("placement", || async {
        (store.get_deployment(&d.id).await.unwrap().status == DeploymentStatus::Starting).then_some(())
    })
    .await;
    let instances = store.list_instances(&d.id).await.unwrap();
    assert_eq!(instances.len(), 1, "placed once: {instances:?}");
    store.set_instance_status(&instances[0].id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
    eventually("activation", || async {
        (store.get_deployment(&d.id).await.unwrap().status == DeploymentStatus::Active).then_some(())
    })
    .await;
    assert_eq!(store.list_instances(&d.id).await.unwrap().len(), 1, "nothing placed twice");
    assert_eq!(config.outcomes.get(DeploymentStatus::Active), 1, "counted once, by the leader");
    stop_tx.send(true).unwrap();
    for e in engines {
        e.await.unwrap();
    }
}

/// A running deployment that cannot get its instances for want of capacity
/// says so to the engine's loop (its sweeps then follow each other sooner,
/// since room freed elsewhere is announced for the other deployment only),
/// for as long as the want lasts; the sweep that places it clears it.
#[tokio::test]
async fn a_deployment_short_of_room_is_signalled_while_it_waits() {
    use std::sync::atomic::Ordering::Relaxed;
    use zeitwork_api_types::Environment;
    let dir = tempfile::tempdir().unwrap();
    let (store, _, p) = one_node(dir.path()).await;
    let a = Audit::new("test", "test", "x");
    let config = EngineConfig::default();
    let (d, placed) = placed_and_active(&store, &config, &p).await;
    assert!(!config.waiting_for_room.load(Relaxed), "it had room");

    // Its instance is lost, and another project takes the node's memory meanwhile.
    store
        .set_instance_status(&placed[0].id, InstanceStatus::Exited, None, Some((Some(137), "killed".into())))
        .await
        .unwrap();
    let big = zeitwork_store::NewProject {
        resources: Resources { vcpu: 1, memory: 8192 - 256 },
        ..zeitwork_store::NewProject::named("acme", "big")
    };
    let big = store.create_project(&big, &a).await.unwrap();
    let b = store.create_deployment(&deployment_of(&big, "big-new-acme", Environment::Production), &a).await.unwrap();
    assert!(act_on(&store, &config, std::slice::from_ref(&b.id)).await.unwrap());
    let taken = store.list_instances(&b.id).await.unwrap();
    assert_eq!(taken.len(), 1);
    act_on(&store, &config, std::slice::from_ref(&d.id)).await.unwrap();
    assert!(config.waiting_for_room.load(Relaxed), "short of room after a change");
    pass(&store, &config).await.unwrap();
    assert!(config.waiting_for_room.load(Relaxed), "still short after a sweep");

    // The other project's instance stops (announced for its deployment only): the sweep places this one.
    store.retire_instance(&taken[0].id, "test").await.unwrap();
    store.set_deployment_status(&b.id, DeploymentStatus::Failed, Some("given up")).await.unwrap();
    assert!(pass(&store, &config).await.unwrap());
    assert!(store.list_instances(&d.id).await.unwrap().iter().any(|i| i.status == InstanceStatus::Pending));
    assert!(!config.waiting_for_room.load(Relaxed), "nothing waits");
}
