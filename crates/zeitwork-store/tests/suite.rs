//! The store suite: every case runs against SQLite and against a throwaway
//! PostgreSQL server, each case on a fresh database.

use std::future::Future;
use std::pin::Pin;

use zeitwork_api_types::*;
use zeitwork_store::*;

type Case = fn(Store) -> Pin<Box<dyn Future<Output = ()> + Send>>;

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        const CASES: &[(&str, Case)] = &[$((stringify!($name), |s| Box::pin($name(s)))),*];
    };
}

cases!(
    migrations_are_idempotent,
    regions,
    nodes,
    orgs_and_members,
    projects,
    concurrent_project_creates_yield_one,
    env_vars,
    domains,
    verified_domain_claims_take_over_and_unverified_ones_expire,
    deployments,
    routing_rows_of_some_projects,
    rollbacks_across_migrations,
    builds_queue_claim_log_and_finish,
    uptime_checks_and_samples,
    events_are_atomic_with_changes,
    tokens,
    console_sessions,
    blobs_and_archives,
    traffic_and_rollouts,
    changes_wake_readers,
    private_networks,
    engine_reads_every_deployment_at_once,
    sleeping_deployments_by_node,
    log_drains,
    instance_usage_from_samples,
    node_tunnels,
    nodes_a_change_concerns,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_sqlite() {
    let mut failed = Vec::new();
    for (name, case) in CASES {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("zeitwork.db")).await.unwrap();
        eprintln!("sqlite: {name}");
        run_case(name, case, store, &mut failed).await;
    }
    assert!(failed.is_empty(), "failing cases on SQLite: {}", failed.join(", "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn suite_postgres() {
    let pg = zeitwork_testkit::Postgres::start().expect("start a throwaway PostgreSQL");
    let mut failed = Vec::new();
    for (i, (name, case)) in CASES.iter().enumerate() {
        let url = pg.create_database(&format!("case{i}")).unwrap();
        let store = Store::connect(&url).await.unwrap();
        eprintln!("postgres: {name}");
        run_case(name, case, store, &mut failed).await;
    }
    assert!(failed.is_empty(), "failing cases on PostgreSQL: {}", failed.join(", "));
}

/// Runs one case in a task of its own, so a failing case (its panic is
/// printed as it happens) is counted and the next case still runs.
async fn run_case(name: &str, case: &Case, store: Store, failed: &mut Vec<String>) {
    let outcome = tokio::spawn(case(store.clone())).await;
    store.close().await;
    if outcome.is_err() {
        failed.push(name.to_owned());
    }
}

/// A change made through one operator wakes the readers of another on the
/// same PostgreSQL (LISTEN/NOTIFY), not only the readers of its own process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_reach_other_operators() {
    let pg = zeitwork_testkit::Postgres::start().expect("start a throwaway PostgreSQL");
    let url = pg.create_database("changes").unwrap();
    let (a, b) = (Store::connect(&url).await.unwrap(), Store::connect(&url).await.unwrap());
    let mut seen_by_b = b.changes();
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn({
        let b = b.clone();
        async move { b.follow_changes(stop_rx).await }
    });
    // The listener wakes its readers once it listens (something may have been missed before).
    seen_by_b.changed().await.unwrap();
    seen_by_b.mark_unchanged();
    // Waits until `b` has been told of `change` since `before`; returns what it was told.
    let told = |seen: &tokio::sync::watch::Receiver<u64>, before: u64, change: zeitwork_store::Change| {
        let (b, mut seen) = (b.clone(), seen.clone());
        async move {
            let wait = tokio::time::timeout(std::time::Duration::from_secs(30), async {
                while !b.changes_since(before).1.unwrap_or_default().contains(&change) {
                    seen.changed().await.unwrap();
                }
            });
            assert!(wait.await.is_ok(), "the other operator was not told of {change:?}: {:?}", b.changes_since(before));
        }
    };
    let before = *seen_by_b.borrow();
    org(&a, "acme").await;
    let p = a.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    // Told what changed: the notification sent inside the project's transaction.
    told(&seen_by_b, before, zeitwork_store::Change::Projects(vec![p.id.clone()])).await;
    // Its own readers are told at once, without the database.
    let mut seen_by_a = a.changes();
    seen_by_a.mark_unchanged();
    let before = *seen_by_b.borrow();
    let d =
        a.create_deployment(&new_deployment(&p, Environment::Production), &audit("deployment.create")).await.unwrap();
    assert!(seen_by_a.has_changed().unwrap());
    told(&seen_by_b, before, zeitwork_store::Change::Deployments(vec![d.id.clone()])).await;
    // A one-statement change is announced from its own transaction too; one
    // that changed nothing is not announced at all.
    let before = *seen_by_b.borrow();
    let latest_a = *a.changes().borrow();
    assert!(!a.claim_deployment(&d.id, DeploymentStatus::Active, DeploymentStatus::Failed).await.unwrap());
    assert_eq!(*a.changes().borrow(), latest_a, "a claim that lost announces nothing");
    assert!(a.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Failed).await.unwrap());
    told(&seen_by_b, before, zeitwork_store::Change::Deployments(vec![d.id.clone()])).await;
    stop.send(true).unwrap();
    listener.await.unwrap();
}

/// A column that is joined to a key compares in the key's collation; in
/// another one its index cannot serve the join, and PostgreSQL scans the
/// whole table instead (every instance to find one node's networks).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_join_columns_share_their_keys_collation() {
    use sqlx::Row;
    let pg = zeitwork_testkit::Postgres::start().expect("start a throwaway PostgreSQL");
    let url = pg.create_database("collations").unwrap();
    Store::connect(&url).await.unwrap().close().await;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    let collation = |table: &str, column: &str| {
        let (pool, table, column) = (pool.clone(), table.to_owned(), column.to_owned());
        async move {
            let sql = "SELECT COALESCE(collation_name, 'default')::text AS c FROM information_schema.columns \
                       WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2";
            let row = sqlx::query(sql).bind(&table).bind(&column).fetch_one(&pool).await.unwrap();
            row.try_get::<String, _>("c").unwrap()
        }
    };
    for (key, joined) in [
        (
            ("deployments", "id"),
            &[
                ("instances", "deployment_id"),
                ("instance_usage", "deployment_id"),
                ("traffic_samples", "deployment_id"),
                ("rollouts", "deployment_id"),
            ][..],
        ),
        (("health_checks", "id"), &[("health_samples", "check_id")][..]),
    ] {
        let want = collation(key.0, key.1).await;
        for (table, column) in joined {
            assert_eq!(collation(table, column).await, want, "{table}.{column} is joined to {}.{}", key.0, key.1);
        }
    }
    pool.close().await;
}

#[tokio::test]
async fn sqlite_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("zeitwork.db");
    let store = Store::open_sqlite(&path).await.unwrap();
    store.create_region(&region("eu-west"), &audit("region.create")).await.unwrap();
    store.close().await;
    let store = Store::open_sqlite(&path).await.unwrap();
    assert_eq!(store.get_region("eu-west").await.unwrap().country, "DE");
}

fn audit(action: &str) -> Audit {
    Audit::new("test", action, "x")
}

fn region(code: &str) -> CreateRegion {
    CreateRegion { code: code.into(), name: format!("Region {code}"), country: "DE".into() }
}

fn node(hostname: &str, region: &str) -> RegisterNode {
    RegisterNode {
        hostname: hostname.into(),
        region: region.into(),
        address: format!("http://{hostname}:8081"),
        capacity: Capacity { vcpu: 8, memory: 16384 },
        physical: Some(Capacity { vcpu: 2, memory: 16384 }),
        runtime: None,
        runtime_detail: None,
        tunnel: None,
    }
}

fn new_project(org: &str, name: &str) -> NewProject {
    NewProject {
        github_repo: Some("acme/webapp".into()),
        auto_deploy: true,
        instances_per_region: 3,
        ..NewProject::named(org, name)
    }
}

async fn org(store: &Store, slug: &str) {
    store.create_org(slug, slug, Some("owner@example.com"), &audit("org.create")).await.unwrap();
}

async fn migrations_are_idempotent(store: Store) {
    assert_eq!(store.migrate().await.unwrap(), Vec::<i64>::new());
    assert_eq!(store.migrate().await.unwrap(), Vec::<i64>::new());
    store.ping().await.unwrap();
}

async fn regions(store: Store) {
    let r = store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    assert_eq!(r.code, "us-east");
    assert!(matches!(
        store.create_region(&region("us-east"), &audit("region.create")).await,
        Err(StoreError::Conflict(_))
    ));
    for c in ["eu-west", "ap-south", "af-north"] {
        store.create_region(&region(c), &audit("region.create")).await.unwrap();
    }
    let page1 = store.list_regions(&Page::first(2)).await.unwrap();
    assert_eq!(page1.items.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), ["af-north", "ap-south"]);
    let page2 = store.list_regions(&Page { limit: 2, cursor: page1.next_cursor.clone() }).await.unwrap();
    assert_eq!(page2.items.iter().map(|r| r.code.as_str()).collect::<Vec<_>>(), ["eu-west", "us-east"]);
    assert!(page2.next_cursor.is_none());

    store.register_node(&node("w1", "us-east"), &audit("node.register")).await.unwrap();
    assert!(matches!(store.delete_region("us-east", &audit("region.delete")).await, Err(StoreError::Conflict(_))));
    store.delete_region("eu-west", &audit("region.delete")).await.unwrap();
    assert!(matches!(store.get_region("eu-west").await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.delete_region("eu-west", &audit("region.delete")).await, Err(StoreError::NotFound(_))));
}

async fn nodes(store: Store) {
    assert!(matches!(
        store.register_node(&node("w1", "nowhere"), &audit("node.register")).await,
        Err(StoreError::Invalid { .. })
    ));
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    let (n1, created) = store.register_node(&node("w1", "us-east"), &audit("node.register")).await.unwrap();
    assert!(created);
    assert_eq!(n1.status, NodeStatus::Ready);
    assert_eq!(n1.instances, 0);
    assert_eq!(n1.allocated, Capacity { vcpu: 0, memory: 0 });
    let mut again = node("w1", "us-east");
    again.capacity.vcpu = 16;
    let (n1b, created) = store.register_node(&again, &audit("node.register")).await.unwrap();
    assert!(!created);
    assert_eq!(n1b.id, n1.id);
    assert_eq!(n1b.capacity.vcpu, 16);
    let hb = store.node_heartbeat(&n1.id).await.unwrap();
    assert!(hb.last_heartbeat >= n1.last_heartbeat);
    assert!(matches!(store.node_heartbeat("node_missing").await, Err(StoreError::NotFound(_))));
    // A deleted node's own credential goes with it, also from what was read recently.
    let mut credential = token("tok_n1", TokenScope::Cluster { role: ClusterRole::NodeAgent });
    credential.token.node = Some(n1.id.clone());
    store.issue_node_credential(&credential, &audit("node.credential")).await.unwrap();
    assert_eq!(store.get_token_recent("tok_n1").await.unwrap().token.node.as_deref(), Some(n1.id.as_str()));
    let drained = store.drain_node(&n1.id, &audit("node.drain")).await.unwrap();
    assert_eq!(drained.status, NodeStatus::Drained);
    store.delete_node(&n1.id, &audit("node.delete")).await.unwrap();
    assert!(matches!(store.get_node(&n1.id).await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.get_token_recent("tok_n1").await, Err(StoreError::NotFound(_))));
    assert_eq!(store.list_nodes(&Page::first(10)).await.unwrap().items.len(), 0);
}

/// A node's tunnel end is what its last registration said, and goes with a
/// registration that sends none.
async fn node_tunnels(store: Store) {
    store.create_region(&region("eu"), &audit("region.create")).await.unwrap();
    let (plain, _) = store.register_node(&node("w1", "eu"), &audit("node.register")).await.unwrap();
    let tunnel_of = |id: &str| {
        let (store, id) = (store.clone(), id.to_owned());
        async move { store.node_tunnels(std::slice::from_ref(&id)).await.unwrap().remove(&id) }
    };
    assert_eq!(tunnel_of(&plain.id).await, None);
    let tunnel = |key: &str, endpoint: &str| NodeTunnel { public_key: key.into(), endpoint: endpoint.into() };
    let mut with = node("w2", "eu");
    with.tunnel = Some(tunnel("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=", "10.0.0.2:51820"));
    let (n2, _) = store.register_node(&with, &audit("node.register")).await.unwrap();
    assert_eq!(tunnel_of(&n2.id).await, with.tunnel);
    // A new key and endpoint replace the old.
    with.tunnel = Some(tunnel("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=", "10.0.0.3:51821"));
    store.register_node(&with, &audit("node.register")).await.unwrap();
    assert_eq!(tunnel_of(&n2.id).await, with.tunnel);
    assert_eq!(tunnel_of(&plain.id).await, None, "another node is untouched");
    with.tunnel = None;
    store.register_node(&with, &audit("node.register")).await.unwrap();
    assert_eq!(tunnel_of(&n2.id).await, None);
    assert_eq!(tunnel_of("node_missing").await, None);
    let both = store.node_tunnels(&[plain.id.clone(), n2.id.clone()]).await.unwrap();
    assert!(both.is_empty(), "neither has a tunnel end now: {both:?}");
}

/// Readers are woken by changes to deployments, instances and nodes, and not
/// by what changes nothing they read (a heartbeat, a lost claim).
async fn changes_wake_readers(store: Store) {
    let mut rx = store.changes();
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    rx.mark_unchanged();
    let (n, _) = store.register_node(&node("w1", "us-east"), &audit("node.register")).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a new node wakes readers");
    rx.mark_unchanged();
    store.node_heartbeat(&n.id).await.unwrap();
    assert!(!rx.has_changed().unwrap(), "a heartbeat of a ready node does not wake readers");
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    rx.mark_unchanged();
    let d = store
        .create_deployment(&new_deployment(&p, Environment::Production), &audit("deployment.create"))
        .await
        .unwrap();
    assert!(rx.has_changed().unwrap(), "a new deployment wakes readers");
    assert!(store.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Preparing).await.unwrap());
    rx.mark_unchanged();
    assert!(!store.claim_deployment(&d.id, DeploymentStatus::Pending, DeploymentStatus::Preparing).await.unwrap());
    assert!(!rx.has_changed().unwrap(), "a lost claim changes nothing");
    let i = store
        .create_instance(&NewInstance {
            deployment: d.id.clone(),
            node: Some(n.id.clone()),
            region: "us-east".into(),
            resources: Resources { vcpu: 1, memory: 128 },
            runtime: None,
        })
        .await
        .unwrap();
    rx.mark_unchanged();
    store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a ready report wakes readers");
    rx.mark_unchanged();
    store.activate_deployment(&d.id, &audit("deployment.activate")).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a switch wakes readers");
}

async fn orgs_and_members(store: Store) {
    org(&store, "acme").await;
    assert!(matches!(store.create_org("acme", "Acme", None, &audit("org.create")).await, Err(StoreError::Conflict(_))));
    let members = store.list_members("acme").await.unwrap();
    assert_eq!(members.len(), 1);
    assert_eq!(members[0].role, Role::Owner);
    let (m, created) =
        store.put_member("acme", "dev@example.com", Role::Developer, &audit("member.add")).await.unwrap();
    assert!(created);
    assert_eq!(m.role, Role::Developer);
    let (_, created) = store.put_member("acme", "dev@example.com", Role::Admin, &audit("member.add")).await.unwrap();
    assert!(!created);
    assert_eq!(store.get_member_role("acme", "dev@example.com").await.unwrap(), Some(Role::Admin));
    // The last owner can be neither removed nor demoted.
    assert!(matches!(
        store.remove_member("acme", "owner@example.com", &audit("member.remove")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.put_member("acme", "owner@example.com", Role::Guest, &audit("member.add")).await,
        Err(StoreError::Conflict(_))
    ));
    store.remove_member("acme", "dev@example.com", &audit("member.remove")).await.unwrap();
    assert!(matches!(
        store.remove_member("acme", "dev@example.com", &audit("member.remove")).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(store.list_members("nope").await, Err(StoreError::NotFound(_))));
    let only = vec!["acme".to_string()];
    org(&store, "other").await;
    assert_eq!(store.list_orgs(Some(&only), &Page::first(10)).await.unwrap().items.len(), 1);
    assert_eq!(store.list_orgs(None, &Page::first(10)).await.unwrap().items.len(), 2);
}

async fn projects(store: Store) {
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    store.create_region(&region("eu-west"), &audit("region.create")).await.unwrap();
    assert!(matches!(
        store.create_project(&new_project("acme", "web"), &audit("project.create")).await,
        Err(StoreError::NotFound(_))
    ));
    org(&store, "acme").await;
    org(&store, "a").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    assert_eq!(p.regions, ["eu-west", "us-east"]);
    assert_eq!(p.resources, Resources { vcpu: 1, memory: 256 });
    assert!(p.auto_deploy);
    assert!(matches!(
        store.create_project(&new_project("acme", "web"), &audit("project.create")).await,
        Err(StoreError::Conflict(_))
    ));
    let mut bad = new_project("acme", "api");
    bad.regions = Some(vec!["mars".into()]);
    assert!(matches!(
        store.create_project(&bad, &audit("project.create")).await,
        Err(StoreError::Invalid { field, .. }) if field == "regions[0]"
    ));
    // Ordering is by "org/name", byte-wise on both backends.
    store.create_project(&new_project("a", "x"), &audit("project.create")).await.unwrap();
    store.create_project(&new_project("acme", "api"), &audit("project.create")).await.unwrap();
    let all = store.list_projects(None, None, &Page::first(10)).await.unwrap();
    let names: Vec<String> = all.items.iter().map(|p| format!("{}/{}", p.org, p.name)).collect();
    assert_eq!(names, ["a/x", "acme/api", "acme/web"]);
    let first = store.list_projects(None, None, &Page::first(1)).await.unwrap();
    let rest = store.list_projects(None, None, &Page { limit: 5, cursor: first.next_cursor }).await.unwrap();
    assert_eq!(rest.items.len(), 2);
    assert_eq!(store.list_projects(Some("acme"), None, &Page::first(10)).await.unwrap().items.len(), 2);

    let patch = PatchProject {
        auto_deploy: Some(false),
        resources: Some(Resources { vcpu: 4, memory: 2048 }),
        image_template: Some(Some("ghcr.io/acme/web:sha-{sha}".into())),
        ..Default::default()
    };
    let p2 = store.update_project("acme", "web", &patch, &audit("project.update")).await.unwrap();
    assert!(!p2.auto_deploy);
    assert_eq!(p2.resources, Resources { vcpu: 4, memory: 2048 });
    assert_eq!(p2.port, 8080);
    assert_eq!(p2.github_repo.as_deref(), Some("acme/webapp"));
    let clear = PatchProject { github_repo: Some(None), ..Default::default() };
    let p3 = store.update_project("acme", "web", &clear, &audit("project.update")).await.unwrap();
    assert_eq!(p3.github_repo, None);
    assert_eq!(p3.image_template.as_deref(), Some("ghcr.io/acme/web:sha-{sha}"));
    let bad_patch = PatchProject { regions: Some(vec!["mars".into()]), port: Some(9999), ..Default::default() };
    assert!(store.update_project("acme", "web", &bad_patch, &audit("project.update")).await.is_err());
    assert_eq!(store.get_project("acme", "web").await.unwrap().port, 8080, "a rejected patch changes nothing");

    store.delete_project("acme", "web", &audit("project.delete")).await.unwrap();
    assert!(matches!(store.get_project("acme", "web").await, Err(StoreError::NotFound(_))));
}

async fn concurrent_project_creates_yield_one(store: Store) {
    org(&store, "acme").await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(
                async move { store.create_project(&new_project("acme", "web"), &audit("project.create")).await },
            )
        })
        .collect();
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 49));
}

async fn env_vars(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    assert!(store.put_env(&p.id, "A", "enc-a", 10, &audit("env.set")).await.unwrap());
    assert!(!store.put_env(&p.id, "A", "enc-a2", 10, &audit("env.set")).await.unwrap());
    store.put_env(&p.id, "B", "enc-b", 10, &audit("env.set")).await.unwrap();
    let vars = store.list_env(&p.id).await.unwrap();
    assert_eq!(
        vars.iter().map(|v| (v.key.as_str(), v.value_enc.as_str())).collect::<Vec<_>>(),
        [("A", "enc-a2"), ("B", "enc-b")]
    );
    assert!(matches!(store.put_env(&p.id, "C", "c", 2, &audit("env.set")).await, Err(StoreError::Conflict(_))));
    store.replace_env(&p.id, &[("X".into(), "enc-x".into())], &audit("env.replace")).await.unwrap();
    let vars = store.list_env(&p.id).await.unwrap();
    assert_eq!(vars.len(), 1);
    assert_eq!(vars[0].key, "X");
    store.delete_env(&p.id, "X", &audit("env.delete")).await.unwrap();
    assert!(matches!(store.delete_env(&p.id, "X", &audit("env.delete")).await, Err(StoreError::NotFound(_))));
}

async fn domains(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let q = store.create_project(&new_project("acme", "api"), &audit("project.create")).await.unwrap();
    let d = store.create_domain(&p.id, "www.example.com", Environment::Production, &audit("domain.add")).await.unwrap();
    assert_eq!((d.org.as_str(), d.project.as_str(), d.verified), ("acme", "web", false));
    assert!(matches!(
        store.create_domain(&q.id, "www.example.com", Environment::Production, &audit("domain.add")).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.list_domains(&p.id).await.unwrap().len(), 1);
    assert!(matches!(
        store.delete_domain(&q.id, "www.example.com", &audit("domain.delete")).await,
        Err(StoreError::NotFound(_))
    ));
    store.delete_domain(&p.id, "www.example.com", &audit("domain.delete")).await.unwrap();
    assert!(store.list_domains(&p.id).await.unwrap().is_empty());
}

async fn verified_domain_claims_take_over_and_unverified_ones_expire(store: Store) {
    org(&store, "acme").await;
    org(&store, "other").await;
    let a = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let b = store.create_project(&new_project("other", "site"), &audit("project.create")).await.unwrap();
    let c = store.create_project(&new_project("other", "blog"), &audit("project.create")).await.unwrap();
    let prod = Environment::Production;
    store.create_domain(&a.id, "shop.example.com", prod, &audit("domain.add")).await.unwrap();
    // Another org may claim a name that is only claimed; its own org may not twice.
    let claimed = store.create_domain(&b.id, "shop.example.com", prod, &audit("domain.add")).await.unwrap();
    assert!(!claimed.verified);
    assert!(matches!(
        store.create_domain(&c.id, "shop.example.com", prod, &audit("domain.add")).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(!store.domain_is_verified("shop.example.com").await.unwrap());
    // The first to verify takes it; the other claim goes, with an event for its project.
    let events_before = store.newest_event_id().await.unwrap();
    store.verify_domain(&b.id, "shop.example.com", &audit("domain.verify")).await.unwrap();
    assert!(store.list_domains(&a.id).await.unwrap().is_empty());
    assert!(store.list_domains(&b.id).await.unwrap()[0].verified);
    assert!(store.domain_is_verified("shop.example.com").await.unwrap());
    assert_eq!(store.domain_owner("shop.example.com").await.unwrap(), Some(("other".into(), "site".into())));
    let events = store.events_after(events_before, 10).await.unwrap();
    let released = events.iter().find(|e| e.action == "domain.release").expect("a domain.release event");
    assert_eq!((released.org.as_deref(), released.project.as_deref()), (Some("acme"), Some("web")));
    // A verified name is refused to everyone else, and cannot be verified twice.
    assert!(matches!(
        store.create_domain(&a.id, "shop.example.com", prod, &audit("domain.add")).await,
        Err(StoreError::Conflict(_))
    ));

    // Unverified claims older than the cutoff expire; verified ones stay.
    store.create_domain(&a.id, "old.example.com", prod, &audit("domain.add")).await.unwrap();
    assert!(store.expire_domain_claims(0).await.unwrap().is_empty(), "nothing is older than the epoch");
    let future = chrono::Utc::now().timestamp_millis() + 60_000;
    let gone = store.expire_domain_claims(future).await.unwrap();
    assert_eq!(gone, vec![("acme".to_owned(), "web".to_owned(), "old.example.com".to_owned())]);
    assert!(store.list_domains(&a.id).await.unwrap().is_empty());
    assert_eq!(store.list_domains(&b.id).await.unwrap().len(), 1, "the verified domain stays");
    let events = store.events_after(events_before, 20).await.unwrap();
    assert!(events.iter().any(|e| e.action == "domain.expire" && e.target == "old.example.com"));
}

fn new_deployment(p: &Project, env: Environment) -> NewDeployment {
    let id = format!("{}-{}-{}", p.name, nanoid(7), p.org);
    NewDeployment {
        url: format!("https://{id}.zeitwork.localhost"),
        environment: env,
        commit_sha: Some("abcdef1".into()),
        commit_message: Some("first".into()),
        instances_per_region: 1,
        created_by: Some("test".into()),
        ..NewDeployment::of(p, &id, "ghcr.io/acme/web:1")
    }
}

async fn deployments(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..5 {
        let env = if i % 2 == 0 { Environment::Production } else { Environment::Staging };
        let d = store.create_deployment(&new_deployment(&p, env), &audit("deployment.create")).await.unwrap();
        assert_eq!(d.status, DeploymentStatus::Pending);
        ids.push(d.id);
    }
    let got = store.get_deployment(&ids[0]).await.unwrap();
    assert_eq!(got.commit_sha.as_deref(), Some("abcdef1"));
    let f = DeploymentFilter { environment: Some(Environment::Production), ..Default::default() };
    assert_eq!(store.list_deployments(&f, &Page::first(10)).await.unwrap().items.len(), 3);
    // Walk all pages of two; each deployment appears exactly once.
    let mut seen = Vec::new();
    let mut page = Page::first(2);
    loop {
        let l = store.list_deployments(&DeploymentFilter::default(), &page).await.unwrap();
        seen.extend(l.items.into_iter().map(|d| d.id));
        match l.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
    let f = DeploymentFilter { status: Some(DeploymentStatus::Active), ..Default::default() };
    assert!(store.list_deployments(&f, &Page::first(10)).await.unwrap().items.is_empty());
    assert!(matches!(store.get_deployment("nope").await, Err(StoreError::NotFound(_))));

    // Two engines racing to place one deployment: exactly one wins.
    let claims: Vec<_> = (0..10)
        .map(|_| {
            let store = store.clone();
            let id = ids[0].clone();
            tokio::spawn(async move {
                store.claim_deployment(&id, DeploymentStatus::Pending, DeploymentStatus::Preparing).await.unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for c in claims {
        won += usize::from(c.await.unwrap());
    }
    assert_eq!(won, 1);
    assert_eq!(store.get_deployment(&ids[0]).await.unwrap().status, DeploymentStatus::Preparing);
}

/// The rows of some projects are those a whole read has for them, and
/// name every project read (one without routes too); too many projects at
/// once are left to a whole read.
async fn routing_rows_of_some_projects(store: Store) {
    store.create_region(&region("eu"), &audit("region.create")).await.unwrap();
    let (n, _) = store.register_node(&node("n1", "eu"), &audit("node.register")).await.unwrap();
    org(&store, "acme").await;
    let mut deployments = Vec::new();
    for name in ["web", "api", "idle"] {
        let p = store.create_project(&new_project("acme", name), &audit("project.create")).await.unwrap();
        if name == "idle" {
            continue;
        }
        let d = store.create_deployment(&new_deployment(&p, Environment::Production), &audit("d")).await.unwrap();
        for k in 0..2 {
            let i = store
                .create_instance(&NewInstance {
                    deployment: d.id.clone(),
                    node: Some(n.id.clone()),
                    region: "eu".into(),
                    resources: p.resources,
                    runtime: None,
                })
                .await
                .unwrap();
            store
                .set_instance_status(&i.id, InstanceStatus::Ready, Some(&format!("10.0.0.{k}:8080")), None)
                .await
                .unwrap();
        }
        store.activate_deployment(&d.id, &audit("deployment.activate")).await.unwrap();
        deployments.push((name, p.id, d.id));
    }
    let idle = store.get_project("acme", "idle").await.unwrap();
    let whole = store.routing_rows().await.unwrap();
    assert_eq!(whole.deployments.len(), 2);
    assert_eq!(whole.current.len(), 2);

    let (web_project, web) = (&deployments[0].1, &deployments[0].2);
    let (names, rows) =
        store.routing_rows_of(std::slice::from_ref(web), std::slice::from_ref(&idle.id)).await.unwrap().unwrap();
    assert_eq!(names, [("acme".to_owned(), "idle".to_owned()), ("acme".to_owned(), "web".to_owned())]);
    let ids: Vec<&str> = rows.deployments.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [web.as_str()]);
    let of_whole = whole.deployments.iter().find(|d| d.id == *web).unwrap();
    assert_eq!(rows.deployments[0].instances, of_whole.instances);
    assert_eq!(rows.deployments[0].instances.len(), 2);
    assert!(rows.current.iter().all(|c| c.project == "web"), "{:?}", rows.current);
    let (by_project, _) = store.routing_rows_of(&[], std::slice::from_ref(web_project)).await.unwrap().unwrap();
    assert_eq!(by_project, [("acme".to_owned(), "web".to_owned())]);

    let many: Vec<String> = (0..=ROUTING_READ_MAX_PROJECTS).map(|i| format!("prj_{i}")).collect();
    assert!(store.routing_rows_of(&[], &many).await.unwrap().is_none());
}

/// Which rollbacks go back past a deployment that migrated data: only
/// migrating deployments that served the environment count, and going forward
/// crosses nothing.
async fn rollbacks_across_migrations(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let live = |env: Environment, migration: bool| {
        let (store, p) = (store.clone(), p.clone());
        async move {
            // Creation times order deployments; keep them a few milliseconds apart.
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            let new = NewDeployment { migration, ..new_deployment(&p, env) };
            let d = store.create_deployment(&new, &audit("deployment.create")).await.unwrap();
            store.point_environment(&d.id, env, &audit("deployment.activate")).await.unwrap();
            d.id
        }
    };
    let prod = Environment::Production;
    let d1 = live(prod, false).await;
    let staging_migration = live(Environment::Staging, true).await;
    let d2 = live(prod, false).await;
    let d3 = live(prod, true).await;
    let d4 = live(prod, false).await;
    let crosses = |from: &str, to: &str| {
        let (store, from, to) = (store.clone(), from.to_owned(), to.to_owned());
        async move { store.rollback_crosses_migration(&from, &to, prod).await.unwrap().map(|d| d.id) }
    };
    assert_eq!(crosses(&d2, &d1).await, None, "{staging_migration} never served production");
    assert_eq!(crosses(&d4, &d1).await, Some(d3.clone()));
    assert_eq!(crosses(&d4, &d2).await, Some(d3.clone()));
    assert_eq!(crosses(&d3, &d2).await, Some(d3.clone()), "leaving the migrating deployment itself");
    assert_eq!(crosses(&d4, &d3).await, None, "back to the migrating deployment");
    assert_eq!(crosses(&d2, &d4).await, None, "forward");
    let got = store.get_deployment(&d3).await.unwrap();
    assert!(got.migration);
    assert!(!store.get_deployment(&d4).await.unwrap().migration);
}

async fn events_are_atomic_with_changes(store: Store) {
    let before = store.list_events(&EventFilter::default(), &Page::first(100)).await.unwrap().items.len();
    store.create_region(&region("us-east"), &Audit::new("alice", "region.create", "us-east")).await.unwrap();
    let _ = store.create_region(&region("us-east"), &Audit::new("alice", "region.create", "us-east")).await;
    let events = store.list_events(&EventFilter::default(), &Page::first(100)).await.unwrap().items;
    assert_eq!(events.len(), before + 1, "a rejected change writes no event");
    assert_eq!(events[0].actor, "alice");
    assert_eq!(events[0].action, "region.create");
    assert_eq!(events[0].result, "ok");
    store.record_event(&Audit::new("mallory", "project.delete", "acme/web").org("acme"), "denied").await.unwrap();
    let f = EventFilter { org: Some("acme".into()), ..Default::default() };
    let denied = store.list_events(&f, &Page::first(10)).await.unwrap().items;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].result, "denied");
}

fn token(id: &str, scope: TokenScope) -> StoredToken {
    StoredToken {
        token: Token {
            id: id.into(),
            name: "t".into(),
            scope,
            read_only: false,
            created_by: None,
            created_at: chrono::Utc::now(),
            expires_at: None,
            node: None,
        },
        secret_hash: "00".repeat(32),
    }
}

async fn tokens(store: Store) {
    assert!(store.bootstrap_admin_token(&token("tok_a", TokenScope::Admin)).await.unwrap());
    assert!(!store.bootstrap_admin_token(&token("tok_b", TokenScope::Admin)).await.unwrap());
    assert!(matches!(store.get_token("tok_b").await, Err(StoreError::NotFound(_))));
    let scope = TokenScope::Org { org: "acme".into(), role: Role::Developer };
    store.create_token(&token("tok_c", scope.clone()), &audit("token.create")).await.unwrap();
    store
        .create_token(&token("tok_d", TokenScope::Cluster { role: ClusterRole::NodeAgent }), &audit("token.create"))
        .await
        .unwrap();
    assert_eq!(store.get_token("tok_c").await.unwrap().token.scope, scope);
    assert_eq!(store.list_tokens(None, &Page::first(10)).await.unwrap().items.len(), 3);
    assert_eq!(store.list_tokens(Some("acme"), &Page::first(10)).await.unwrap().items.len(), 1);
    // Read recently, a token is answered from memory until it is deleted through any handle of the store.
    assert_eq!(store.get_token_recent("tok_c").await.unwrap().token.scope, scope);
    let other = store.clone();
    store.delete_token("tok_c", &audit("token.delete")).await.unwrap();
    assert!(matches!(other.get_token_recent("tok_c").await, Err(StoreError::NotFound(_))));
    assert!(matches!(store.delete_token("tok_c", &audit("token.delete")).await, Err(StoreError::NotFound(_))));
    // A token unknown when first asked for is read again: one created since is found.
    assert!(matches!(store.get_token_recent("tok_e").await, Err(StoreError::NotFound(_))));
    store.create_token(&token("tok_e", scope.clone()), &audit("token.create")).await.unwrap();
    assert_eq!(store.get_token_recent("tok_e").await.unwrap().token.id, "tok_e");
}

async fn console_sessions(store: Store) {
    let now = chrono::Utc::now().timestamp_millis();
    let session = |hash: &str, token: &str, expires_at_ms: i64, owns_token: bool| ConsoleSession {
        id_hash: hash.into(),
        token_id: token.into(),
        csrf: format!("csrf-{hash}"),
        owns_token,
        created_at_ms: now,
        expires_at_ms,
    };
    let live = session("h1", "tok_a", now + 3_600_000, false);
    store.create_console_session(&live).await.unwrap();
    store.create_console_session(&session("h2", "tok_b", now - 1, true)).await.unwrap();
    store.create_console_session(&session("h3", "tok_c", now - 1, false)).await.unwrap();
    assert_eq!(store.get_console_session("h1").await.unwrap(), live);
    assert!(matches!(store.get_console_session("h2").await, Err(StoreError::NotFound(_))), "expired is gone");
    assert_eq!(
        store.expire_console_sessions().await.unwrap(),
        vec!["tok_b".to_owned()],
        "owned tokens of expired ones"
    );
    assert!(store.expire_console_sessions().await.unwrap().is_empty());
    assert_eq!(store.delete_console_session("h1").await.unwrap(), Some(live));
    assert_eq!(store.delete_console_session("h1").await.unwrap(), None);
}

async fn blobs_and_archives(store: Store) {
    org(&store, "acme").await;
    let digest = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(store.blob_size(&digest).await.unwrap(), None);
    // Every byte value survives the round trip, in order, chunk by chunk.
    let first: Vec<u8> = (0..=255u8).cycle().take(BLOB_CHUNK).collect();
    store.put_blob_chunk(&digest, 0, first.clone()).await.unwrap();
    store.put_blob_chunk(&digest, 1, vec![0, 1, 2]).await.unwrap();
    // Not visible until finished.
    assert_eq!(store.blob_size(&digest).await.unwrap(), None);
    store.finish_blob(&digest, BLOB_CHUNK as i64 + 3).await.unwrap();
    assert_eq!(store.blob_size(&digest).await.unwrap(), Some(BLOB_CHUNK as i64 + 3));
    assert_eq!(store.blob_chunk(&digest, 0).await.unwrap().unwrap(), first);
    assert_eq!(store.blob_chunk(&digest, 1).await.unwrap().unwrap(), vec![0, 1, 2]);
    assert_eq!(store.blob_chunk(&digest, 2).await.unwrap(), None);

    let a = StoredArchive {
        id: "img_1".into(),
        org: "acme".into(),
        name: "web".into(),
        manifest_digest: format!("sha256:{}", "cd".repeat(32)),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        blobs: vec![digest.clone()],
        size: 3,
        created_by: None,
    };
    let audit = Audit::new("test", "image.upload", "acme/web");
    assert_eq!(store.create_archive(&a, &audit).await.unwrap(), a);
    // The same image again is the same record.
    let again = StoredArchive { id: "img_2".into(), ..a.clone() };
    assert_eq!(store.create_archive(&again, &audit).await.unwrap().id, "img_1");
    assert_eq!(store.find_archive("acme", "web", &a.manifest_digest).await.unwrap(), Some(a.clone()));
    assert_eq!(store.find_archive("acme", "api", &a.manifest_digest).await.unwrap(), None);
    assert!(store.archive_names_blob("acme", "web", &digest).await.unwrap());
    assert!(store.archive_names_blob("acme", "web", &a.manifest_digest).await.unwrap());
    assert!(!store.archive_names_blob("acme", "api", &digest).await.unwrap());
    assert!(!store.archive_names_blob("acme", "web", "sha256:00").await.unwrap());
}

async fn builds_queue_claim_log_and_finish(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    assert!(!store.put_source("acme", "sha256:aa", 10).await.unwrap());
    assert!(store.put_source("acme", "sha256:aa", 10).await.unwrap(), "the second upload is known");
    assert_eq!(store.source_size("acme", "sha256:aa").await.unwrap(), Some(10));
    assert_eq!(store.source_size("other", "sha256:aa").await.unwrap(), None, "sources belong to one org");
    let spec = BuildSpec {
        source: zeitwork_api_types::BuildSource::Upload { digest: "sha256:aa".into() },
        dockerfile: "Dockerfile".into(),
        target: None,
        args: Default::default(),
        secret_names: vec![],
    };
    let mut one = new_deployment(&p, Environment::Production);
    one.image = String::new();
    let d = store.create_build(&one, &spec, Some("enc".into()), &audit("deployment.create")).await.unwrap();
    assert_eq!(d.status, DeploymentStatus::Building);
    // Queued in a later millisecond, so "oldest first" has one answer.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let mut two = new_deployment(&p, Environment::Production);
    two.image = String::new();
    store.create_build(&two, &spec, None, &audit("deployment.create")).await.unwrap();

    // Oldest first, and never to two builders.
    let b = store.claim_build("node-a").await.unwrap().unwrap();
    assert_eq!(b.id, one.id);
    assert_eq!(b.spec, spec);
    assert_eq!(b.secrets_enc.as_deref(), Some("enc"));
    let c = store.claim_build("node-b").await.unwrap().unwrap();
    assert_eq!(c.id, two.id);
    assert!(store.claim_build("node-c").await.unwrap().is_none());

    assert!(store.append_build_log(&one.id, "node-a", "step 1\n").await.unwrap());
    assert!(store.append_build_log(&one.id, "node-a", "step 2 ✓\n").await.unwrap());
    assert!(!store.append_build_log(&one.id, "node-b", "not yours\n").await.unwrap());
    let (all, status) = store.build_log(&one.id, 0).await.unwrap();
    assert_eq!((all.as_str(), status.as_str()), ("step 1\nstep 2 ✓\n", "running"));
    let (rest, _) = store.build_log(&one.id, 7).await.unwrap();
    assert_eq!(rest, "step 2 ✓\n", "offsets count characters");

    store
        .finish_build(&one.id, "node-a", "archive.zeitwork/acme/web@sha256:bb", "sha256:bb", &audit("build.succeed"))
        .await
        .unwrap();
    let d = store.get_deployment(&one.id).await.unwrap();
    assert_eq!(d.status, DeploymentStatus::Pending, "built: placed like any deployment");
    assert_eq!(d.image, "archive.zeitwork/acme/web@sha256:bb");
    assert!(d.build_ms.is_some());
    assert!(!store.append_build_log(&one.id, "node-a", "late\n").await.unwrap(), "a finished build takes no output");

    assert!(store
        .fail_build(&two.id, Some("node-b"), "build failed: exit 1", &audit("deployment.fail"))
        .await
        .unwrap());
    assert!(
        !store.fail_build(&two.id, None, "again", &audit("deployment.fail")).await.unwrap(),
        "failing twice is a no-op"
    );
    let d = store.get_deployment(&two.id).await.unwrap();
    assert_eq!((d.status, d.reason.as_deref()), (DeploymentStatus::Failed, Some("build failed: exit 1")));
    assert_eq!(store.get_build(&two.id).await.unwrap().status, "failed");

    // A builder that went silent is found.
    let mut three = new_deployment(&p, Environment::Staging);
    three.image = String::new();
    store.create_build(&three, &spec, None, &audit("deployment.create")).await.unwrap();
    store.claim_build("node-c").await.unwrap().unwrap();
    let later = chrono::Utc::now().timestamp_millis() + 1000;
    let stale: Vec<String> = store.stale_builds(later).await.unwrap().into_iter().map(|b| b.id).collect();
    assert_eq!(stale, vec![three.id.clone()]);
}

/// The store speaks TLS to PostgreSQL: `sslmode=require` encrypts, and
/// `sslmode=verify-full` with `sslrootcert` also checks the server's certificate.
#[tokio::test]
async fn postgres_over_tls() {
    let pg = zeitwork_testkit::Postgres::start_tls().expect("a PostgreSQL server with TLS");
    let url = pg.create_database("tls").unwrap();
    let ca = pg.ca_path().display().to_string();
    for (i, params) in
        ["sslmode=require".to_owned(), format!("sslmode=verify-full&sslrootcert={ca}")].iter().enumerate()
    {
        let u = url.replace("127.0.0.1", "localhost");
        let store = Store::connect(&format!("{u}?{params}")).await.unwrap_or_else(|e| panic!("{params}: {e}"));
        store.migrate().await.unwrap();
        org(&store, &format!("acme{i}")).await;
        store.close().await;
    }
    // Encrypted for real: the server reports the session's TLS.
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&format!("{url}?sslmode=require")).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "the session is not encrypted");
    // A certificate from another CA is refused under verify-full.
    let other = tempfile::NamedTempFile::new().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(other.path(), params.self_signed(&key).unwrap().pem()).unwrap();
    let wrong =
        format!("{}?sslmode=verify-full&sslrootcert={}", url.replace("127.0.0.1", "localhost"), other.path().display());
    assert!(Store::connect(&wrong).await.is_err(), "a server certificate from an unknown CA must be refused");
}

/// A PostgreSQL that takes only TLS (`hostssl` lines alone in pg_hba.conf),
/// its certificate (for `db.zeitwork.test` and 127.0.0.1) from a CA made here
/// with openssl: TLS turned off fails at start naming sslmode and what to set;
/// `verify-ca` with that CA works; `verify-full` by a name the certificate
/// lacks, and `verify-ca` with another CA, fail saying what to change.
#[tokio::test]
async fn postgres_that_takes_only_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = zeitwork_testkit::OpensslCa::new(dir.path(), "db-ca").expect("a CA made with openssl");
    let (cert, key) = ca.issue("server", &["db.zeitwork.test"], &["127.0.0.1"]).unwrap();
    let other = zeitwork_testkit::OpensslCa::new(dir.path(), "other-ca").unwrap();
    let pg = zeitwork_testkit::Postgres::start_tls_only(&cert, &key).expect("a PostgreSQL server taking only TLS");
    let url = pg.create_database("tlsonly").unwrap();
    let root = ca.root().display().to_string();

    // (a) Without TLS: refused by the server, and the error says what to set.
    let err = Store::connect(&format!("{url}?sslmode=disable")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::TlsRequired { .. }), "{err:?}");
    assert!(msg.contains("only TLS") && msg.contains("sslmode=disable"), "{msg}");
    assert!(msg.contains("set sslmode=verify-full&sslrootcert="), "the message says what to set: {msg}");

    // (b) verify-ca with the CA: served, over TLS for real.
    let store = Store::connect(&format!("{url}?sslmode=verify-ca&sslrootcert={root}"))
        .await
        .unwrap_or_else(|e| panic!("verify-ca: {e}: {:?}", std::error::Error::source(&e)));
    org(&store, "acme").await;
    assert_eq!(store.get_org("acme").await.unwrap().slug, "acme");
    store.close().await;
    // verify-full by the address the certificate holds works too.
    let store = Store::connect(&format!("{url}?sslmode=verify-full&sslrootcert={root}")).await.unwrap();
    assert_eq!(store.get_org("acme").await.unwrap().slug, "acme");
    store.close().await;
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&format!("{url}?sslmode=verify-ca&sslrootcert={root}")).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(ssl, "the session is not encrypted");

    // (c) verify-full by a host name the certificate does not hold.
    let by_name = url.replace("127.0.0.1", "localhost");
    let err = Store::connect(&format!("{by_name}?sslmode=verify-full&sslrootcert={root}")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Tls { .. }), "{err:?}");
    assert!(msg.contains("not valid for the host name \"localhost\""), "{msg}");
    assert!(msg.contains("sslmode=verify-ca"), "the message offers a way out: {msg}");

    // (d) verify-ca with a CA that did not sign the server's certificate.
    let wrong = other.root().display().to_string();
    let err = Store::connect(&format!("{url}?sslmode=verify-ca&sslrootcert={wrong}")).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Tls { .. }), "{err:?}");
    assert!(msg.contains("not signed by a CA") && msg.contains(&wrong), "{msg}");
    assert!(msg.contains("set sslrootcert to"), "the message says what to set: {msg}");

    // A CA file that is not there is named.
    let err = Store::connect(&format!("{url}?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")).await.unwrap_err();
    assert!(err.to_string().contains("sslrootcert /nonexistent/ca.pem cannot be read"), "{err}");
}

async fn uptime_checks_and_samples(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let now = chrono::Utc::now();
    let c = StoredCheck {
        id: "chk_one".into(),
        project_id: p.id.clone(),
        org: "acme".into(),
        project: "web".into(),
        spec: serde_json::json!({"path": "/", "interval_secs": 10}),
        state: "unknown".into(),
        fails: 0,
        passes: 0,
        next_at: now.timestamp_millis(),
        created_at: now,
        updated_at: now,
    };
    store.create_check(&c, &audit("health_check.create")).await.unwrap();
    let due = store.due_checks(now.timestamp_millis()).await.unwrap();
    assert_eq!(due.len(), 1);
    assert!(store.due_checks(now.timestamp_millis()).await.unwrap().is_empty(), "claimed until its next run");
    let sample = |ok: bool, at: i64| Sample {
        id: 0,
        at: chrono::DateTime::from_timestamp_millis(at).unwrap(),
        region: "local".into(),
        ok,
        status: Some(if ok { 200 } else { 500 }),
        latency_ms: 12,
        error: (!ok).then(|| "answered 500".to_owned()),
    };
    let t = now.timestamp_millis();
    assert_eq!(store.record_sample("chk_one", &sample(true, t - 3000), false).await.unwrap().1, "up");
    assert_eq!(store.record_sample("chk_one", &sample(false, t - 2000), false).await.unwrap().1, "degraded");
    let (before, after) = store.record_sample("chk_one", &sample(false, t - 1000), false).await.unwrap();
    assert_eq!((before.as_str(), after.as_str()), ("degraded", "down"));
    let all = store.samples("chk_one", t - 10_000, t, 0, 100).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(all[2].status, Some(500));
    let page = store.samples("chk_one", t - 10_000, t, all[0].id, 1).await.unwrap();
    assert_eq!(page[0].id, all[1].id, "paged after a cursor");
    // The summary is the database's: counts, latency ranks and the latest sample.
    let sum = store.sample_summary("chk_one", t - 10_000, t).await.unwrap();
    assert_eq!((sum.total, sum.passed, sum.p50_ms, sum.p95_ms), (3, 1, Some(12), Some(12)));
    assert_eq!(sum.last.as_ref().map(|s| s.id), Some(all[2].id), "{sum:?}");
    for (i, ms) in [5u64, 40, 7, 90, 3, 11, 60].into_iter().enumerate() {
        let at = t - 900 + i as i64 * 100;
        store.record_sample("chk_one", &Sample { latency_ms: ms, ..sample(true, at) }, false).await.unwrap();
    }
    // Latencies 3 5 7 11 12 12 12 40 60 90: ranks 5 (round(4.5)) and 9 (round(8.55)).
    let sum = store.sample_summary("chk_one", t - 10_000, t).await.unwrap();
    assert_eq!((sum.total, sum.passed, sum.p50_ms, sum.p95_ms), (10, 8, Some(12), Some(90)));
    assert_eq!(sum.last.as_ref().map(|s| s.latency_ms), Some(60), "the latest by time");
    let none = store.sample_summary("chk_one", 0, t - 60_000).await.unwrap();
    assert_eq!((none.total, none.passed, none.p50_ms, none.last), (0, 0, None, None));
    assert_eq!(store.prune_samples(t - 1500, 1000).await.unwrap(), 2);
    store.delete_check("chk_one", &audit("health_check.delete")).await.unwrap();
    // The audit log and delivered notifications are pruned by age, in batches.
    let events = store.list_events(&EventFilter::default(), &Page::first(1000)).await.unwrap().items.len() as u64;
    assert!(events >= 4);
    assert_eq!(store.prune_events(0, 1000).await.unwrap(), 0, "nothing is older than the epoch");
    assert_eq!(store.prune_events(chrono::Utc::now().timestamp_millis() + 1, 2).await.unwrap(), 2, "one batch");
    assert_eq!(store.prune_delivered(chrono::Utc::now().timestamp_millis() + 1, 1000).await.unwrap(), 0);
    assert!(store.samples("chk_one", 0, t, 0, 100).await.unwrap().is_empty());
}

/// The operations guide adds a region with plain SQL on PostgreSQL; the row
/// it leaves is a region like any other, its country given by name.
#[tokio::test]
async fn the_guides_region_insert_works_on_postgres() {
    let pg = zeitwork_testkit::Postgres::start().expect("start a throwaway PostgreSQL");
    let url = pg.create_database("guide").unwrap();
    let store = Store::connect(&url).await.unwrap();
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO regions (id, name, code, country) VALUES (gen_random_uuid(), 'US West', 'us-west', 'United States')",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    let r = store.get_region("us-west").await.unwrap();
    assert_eq!((r.name.as_str(), r.country.as_str()), ("US West", "US"));
    let age = chrono::Utc::now() - r.created_at;
    assert!(age.num_seconds().abs() < 3600, "created_at defaults to now: {}", r.created_at);
    store.register_node(&node("w1", "us-west"), &audit("node.register")).await.unwrap();
    store.close().await;
}

/// Edges' traffic figures add up across edges and replace themselves when
/// sent again; a rollback of a release switches, marks and records in one go.
async fn traffic_and_rollouts(store: Store) {
    org(&store, "acme").await;
    let p = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    assert!(p.auto_rollback.enabled, "automatic rollback is on by default");
    let old = new_deployment(&p, Environment::Production);
    store.create_deployment(&old, &audit("deployment.create")).await.unwrap();
    store.activate_deployment(&old.id, &audit("deployment.activate")).await.unwrap();
    let new = new_deployment(&p, Environment::Production);
    store.create_deployment(&new, &audit("deployment.create")).await.unwrap();

    let report = |requests: u64, errors: u64| {
        let mut t = DeploymentTraffic::default();
        for i in 0..requests {
            t.observe(if i < errors { 500 } else { 200 }, std::time::Duration::from_millis(4));
        }
        std::collections::BTreeMap::from([(new.id.clone(), t)])
    };
    store.record_traffic("edge-a", 1000, &report(10, 2)).await.unwrap();
    store.record_traffic("edge-a", 1000, &report(10, 2)).await.unwrap(); // a retry
    store.record_traffic("edge-b", 1000, &report(5, 5)).await.unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let t = store.traffic_between(&new.id, now - 60_000, now + 1000).await.unwrap();
    assert_eq!((t.requests, t.errors), (15, 7), "two edges add up, a resent report does not");
    assert_eq!(t.latency.iter().sum::<u64>(), 15);
    assert_eq!(store.traffic_between(&old.id, now - 60_000, now + 1000).await.unwrap().requests, 0);

    // A watched release: activated, then rolled back to the previous deployment.
    let r = NewRollout {
        deployment: new.id.clone(),
        environment: Environment::Production,
        baseline: Some(old.id.clone()),
        state: RolloutState::Watching,
        steps: vec![],
        step_secs: 0,
        watch_until: Some(now + 600_000),
    };
    store.start_rollout(&r).await.unwrap();
    store.start_rollout(&r).await.unwrap(); // twice changes nothing
    store.activate_deployment(&new.id, &audit("deployment.activate")).await.unwrap();
    assert_eq!(store.open_rollouts().await.unwrap().len(), 1);
    let to = store.get_deployment(&old.id).await.unwrap();
    assert_eq!(to.status, DeploymentStatus::Standby);
    let a = Audit::new("system", "deployment.auto_rollback", &new.id).org("acme").project("web");
    assert!(store.roll_back_release(&new.id, Some(&to), "5xx rate 100 %", now, &a).await.unwrap());
    assert!(!store.roll_back_release(&new.id, Some(&to), "again", now, &a).await.unwrap(), "once only");
    let bad = store.get_deployment(&new.id).await.unwrap();
    assert_eq!((bad.status, bad.reason.as_deref()), (DeploymentStatus::RolledBack, Some("5xx rate 100 %")));
    assert_eq!(store.get_deployment(&old.id).await.unwrap().status, DeploymentStatus::Active);
    let p = store.get_project("acme", "web").await.unwrap();
    assert_eq!(p.current_deployment.get("production"), Some(&old.id));
    let r = store.get_rollout(&new.id).await.unwrap().unwrap();
    assert_eq!((r.state, r.weight), (RolloutState::RolledBack, 0));
    assert!(store.open_rollouts().await.unwrap().is_empty());
    let filter = EventFilter { action: Some("deployment.auto_rollback".into()), ..Default::default() };
    assert_eq!(store.list_events(&filter, &Page::first(10)).await.unwrap().items.len(), 1);
    // Pruned in batches, oldest first; nothing newer than the cut goes.
    assert_eq!(store.prune_traffic(now - 3_600_000, 1000).await.unwrap(), 0, "nothing is that old");
    assert_eq!(store.prune_traffic(now + 60_000, 1).await.unwrap(), 1, "one batch");
    assert_eq!(store.prune_traffic(now + 60_000, 1000).await.unwrap(), 1, "the rest");
    assert_eq!(store.traffic_between(&new.id, 0, now + 60_000).await.unwrap().requests, 0);
}

/// A network per project and environment and an address per live instance:
/// stable when asked again, distinct under a race, given back once the
/// instance stopped; members list only live instances with addresses.
async fn private_networks(store: Store) {
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    org(&store, "acme").await;
    let web = store
        .create_project(&NewProject { github_repo: None, ..new_project("acme", "web") }, &audit("project.create"))
        .await
        .unwrap();
    let api = store
        .create_project(&NewProject { github_repo: None, ..new_project("acme", "api") }, &audit("project.create"))
        .await
        .unwrap();
    let n_web = store.project_network(&web.id, "production", 4).await.unwrap();
    assert_eq!(store.project_network(&web.id, "production", 4).await.unwrap(), n_web, "stable");
    let n_staging = store.project_network(&web.id, "staging", 4).await.unwrap();
    let n_api = store.project_network(&api.id, "production", 4).await.unwrap();
    let mut all = vec![n_web, n_staging, n_api];
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "one network each");
    let other = store
        .create_project(&NewProject { github_repo: None, ..new_project("acme", "other") }, &audit("project.create"))
        .await
        .unwrap();
    store.project_network(&other.id, "production", 4).await.unwrap();
    let full = store.project_network(&other.id, "staging", 4).await.unwrap_err();
    assert!(matches!(full, StoreError::Conflict(_)), "{full}");

    let d = store.create_deployment(&new_deployment(&web, Environment::Production), &audit("d")).await.unwrap();
    let mut instances = Vec::new();
    for _ in 0..3 {
        let i = NewInstance {
            deployment: d.id.clone(),
            node: None,
            region: "us-east".into(),
            resources: Resources { vcpu: 1, memory: 128 },
            runtime: None,
        };
        instances.push(store.create_instance(&i).await.unwrap().id);
    }
    // Concurrent operators handing out addresses: all distinct.
    let asks: Vec<_> = instances
        .iter()
        .map(|id| {
            let (store, id) = (store.clone(), id.clone());
            tokio::spawn(async move { store.private_host(n_web, &id, 254).await.unwrap() })
        })
        .collect();
    let mut hosts = Vec::new();
    for a in asks {
        hosts.push(a.await.unwrap());
    }
    let mut sorted = hosts.clone();
    sorted.sort();
    assert_eq!(sorted, vec![1, 2, 3]);
    assert_eq!(store.private_host(n_web, &instances[0], 254).await.unwrap(), hosts[0], "stable");
    // Read for many instances at once: the numbers they have; none for one without.
    let mut asked = instances.clone();
    asked.push("ins_without_address".into());
    let known = store.private_hosts(&asked).await.unwrap();
    assert_eq!(known.len(), 3);
    for (id, host) in instances.iter().zip(&hosts) {
        assert_eq!(known[id], *host, "{id}");
    }
    assert!(store.private_hosts(&[]).await.unwrap().is_empty());
    store.set_instance_status(&instances[1], InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
    let members_of = |env: &str| {
        let (store, key) = (store.clone(), (web.id.clone(), env.to_owned()));
        async move { store.networks_members(std::slice::from_ref(&key)).await.unwrap().remove(&key).unwrap_or_default() }
    };
    let members = members_of("production").await;
    assert_eq!(members.len(), 3);
    assert!(members.iter().any(|m| m.instance == instances[1] && m.ready && m.host == hosts[1]));
    assert!(members_of("staging").await.is_empty());
    // A stopped instance leaves the members, and its number goes to the next one.
    store.set_instance_status(&instances[0], InstanceStatus::Stopped, None, None).await.unwrap();
    assert_eq!(members_of("production").await.len(), 2);
    let i = NewInstance {
        deployment: d.id.clone(),
        node: None,
        region: "us-east".into(),
        resources: Resources { vcpu: 1, memory: 128 },
        runtime: None,
    };
    let fresh = store.create_instance(&i).await.unwrap().id;
    assert_eq!(store.private_host(n_web, &fresh, 254).await.unwrap(), hosts[0]);

    // Placed together with their addresses, in one transaction and one announcement.
    let (at, _) = store.changes_since(0);
    let placed = store.place_instances(&[i.clone(), i.clone()], Some(n_web)).await.unwrap();
    assert_eq!(placed.len(), 2);
    assert!(placed.iter().all(|p| p.deployment == d.id && p.status == InstanceStatus::Pending));
    let ids: Vec<String> = placed.iter().map(|p| p.id.clone()).collect();
    let mut given: Vec<u32> = store.private_hosts(&ids).await.unwrap().into_values().collect();
    given.sort();
    assert_eq!(given, vec![4, 5], "the lowest free numbers");
    assert_eq!(store.changes_since(at).1, Some(vec![zeitwork_store::Change::Deployments(vec![d.id.clone()])]));
}

/// The nodes whose assignments a change may alter: every node that holds a
/// live instance of a changed deployment, and the nodes with live instances
/// of its project (their network's members change). A newly handed-out
/// private address announces its project.
async fn nodes_a_change_concerns(store: Store) {
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    let mut nodes = Vec::new();
    for name in ["w1", "w2", "w3", "w4"] {
        nodes.push(store.register_node(&node(name, "us-east"), &audit("node.register")).await.unwrap().0.id);
    }
    org(&store, "acme").await;
    let mut projects = Vec::new();
    for name in ["web", "api"] {
        let p = NewProject { github_repo: None, ..new_project("acme", name) };
        projects.push(store.create_project(&p, &audit("project.create")).await.unwrap());
    }
    let (web, api) = (&projects[0], &projects[1]);
    let mut deployments = Vec::new();
    let mut instances = Vec::new();
    // web: d1 on w1 (ready) and w2 (stopped), d2 on w3; api: d3 on w3.
    for (project, on) in [(web, vec![0, 1]), (web, vec![2]), (api, vec![2])] {
        let d = store.create_deployment(&new_deployment(project, Environment::Production), &audit("d")).await.unwrap();
        for n in on {
            let i = NewInstance {
                deployment: d.id.clone(),
                node: Some(nodes[n].clone()),
                region: "us-east".into(),
                resources: Resources { vcpu: 1, memory: 128 },
                runtime: None,
            };
            let i = store.create_instance(&i).await.unwrap();
            store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
            instances.push(i.id);
        }
        deployments.push(d.id);
    }
    store.set_instance_status(&instances[1], InstanceStatus::Stopped, None, None).await.unwrap();
    let concerned_with = |d: &[&String], p: &[&String], n: &[&String]| {
        let d: Vec<String> = d.iter().map(|s| (*s).clone()).collect();
        let p: Vec<String> = p.iter().map(|s| (*s).clone()).collect();
        let n: Vec<String> = n.iter().map(|s| (*s).clone()).collect();
        let store = store.clone();
        async move { store.nodes_concerned(&d, &p, &n).await.unwrap().into_iter().collect::<Vec<_>>() }
    };
    let concerned = |d: &[&String], p: &[&String]| concerned_with(d, p, &[]);
    let mut want = vec![nodes[0].clone(), nodes[2].clone()];
    want.sort();
    assert_eq!(concerned(&[&deployments[0]], &[]).await, want, "d1's live instance and web's (w2's stopped)");
    let mut want = vec![nodes[0].clone(), nodes[2].clone()];
    want.sort();
    assert_eq!(concerned(&[], &[&web.id]).await, want, "web's live instances");
    assert_eq!(concerned(&[&deployments[2]], &[]).await, vec![nodes[2].clone()]);
    assert_eq!(concerned(&[], &[&api.id]).await, vec![nodes[2].clone()]);
    assert!(concerned(&[], &[]).await.is_empty());
    assert!(concerned(&[&"missing".to_owned()], &[&"missing".to_owned()]).await.is_empty());
    // A node: itself and the nodes sharing a live project with it (w2's web instance stopped).
    let mut want = vec![nodes[0].clone(), nodes[2].clone()];
    want.sort();
    assert_eq!(concerned_with(&[], &[], &[&nodes[0]]).await, want);
    assert_eq!(concerned_with(&[], &[], &[&nodes[3]]).await, vec![nodes[3].clone()], "w4 holds nothing");
    let mut want = vec![nodes[0].clone(), nodes[2].clone(), nodes[3].clone()];
    want.sort();
    assert_eq!(concerned_with(&[], &[], &[&nodes[2], &nodes[3]]).await, want, "w3 holds web and api");

    let net = store.project_network(&web.id, "production", 4).await.unwrap();
    let (at, _) = store.changes_since(0);
    store.private_host(net, &instances[0], 254).await.unwrap();
    let (next, said) = store.changes_since(at);
    assert_eq!(
        said,
        Some(vec![zeitwork_store::Change::Projects(vec![web.id.clone()])]),
        "a new address announces its project"
    );
    store.private_host(net, &instances[0], 254).await.unwrap();
    assert_eq!(store.changes_since(next).1, Some(vec![]), "an address it had announces nothing");
}

/// A node keeps VM snapshots of the sleeping (and waking) deployments that ran
/// on it, and of no others.
async fn sleeping_deployments_by_node(store: Store) {
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    let (n1, _) = store.register_node(&node("w1", "us-east"), &audit("node.register")).await.unwrap();
    let (n2, _) = store.register_node(&node("w2", "us-east"), &audit("node.register")).await.unwrap();
    org(&store, "acme").await;
    let web = store
        .create_project(&NewProject { github_repo: None, ..new_project("acme", "web") }, &audit("project.create"))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for node in [&n1.id, &n1.id, &n2.id] {
        let d = store.create_deployment(&new_deployment(&web, Environment::Production), &audit("d")).await.unwrap();
        let i = NewInstance {
            deployment: d.id.clone(),
            node: Some(node.clone()),
            region: "us-east".into(),
            resources: Resources { vcpu: 1, memory: 128 },
            runtime: None,
        };
        let i = store.create_instance(&i).await.unwrap();
        store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
        store.set_deployment_status(&d.id, DeploymentStatus::Standby, None).await.unwrap();
        ids.push(d.id);
    }
    assert!(store.sleeping_on_node(&n1.id).await.unwrap().is_empty(), "nothing sleeps yet");
    for d in &ids {
        assert!(store.sleep_deployment(d, "idle", &audit("deployment.sleep")).await.unwrap());
    }
    let mut on_n1 = vec![ids[0].clone(), ids[1].clone()];
    on_n1.sort();
    assert_eq!(store.sleeping_on_node(&n1.id).await.unwrap(), on_n1);
    assert_eq!(store.sleeping_on_node(&n2.id).await.unwrap(), vec![ids[2].clone()]);
    // Waking keeps it listed (its new instance may come to this node); retired, it goes.
    assert!(store.wake_deployment(&ids[0], None, &audit("deployment.wake")).await.unwrap());
    store.retire_deployment(&ids[1], "retired", &audit("deployment.retire")).await.unwrap();
    assert_eq!(store.sleeping_on_node(&n1.id).await.unwrap(), vec![ids[0].clone()]);
    store.set_deployment_status(&ids[0], DeploymentStatus::Standby, None).await.unwrap();
    assert!(store.sleeping_on_node(&n1.id).await.unwrap().is_empty(), "awake: its snapshot is stale");
}

/// The engine's set-based reads agree with the per-deployment ones: the
/// deployments of some statuses (in the order asked, newest first) with their
/// wakefulness, the few columns of them and their projects that decide their
/// count of instances, their projects, their instances counted per region
/// and status, and every node's allocation.
async fn engine_reads_every_deployment_at_once(store: Store) {
    store.create_region(&region("us-east"), &audit("region.create")).await.unwrap();
    store.create_region(&region("eu-west"), &audit("region.create")).await.unwrap();
    let (us, _) = store.register_node(&node("w1", "us-east"), &audit("node.register")).await.unwrap();
    let (eu, _) = store.register_node(&node("w2", "eu-west"), &audit("node.register")).await.unwrap();
    let (idle, _) = store.register_node(&node("w3", "eu-west"), &audit("node.register")).await.unwrap();
    org(&store, "acme").await;
    let web = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let api = store.create_project(&new_project("acme", "api"), &audit("project.create")).await.unwrap();
    store.create_project(&new_project("acme", "unused"), &audit("project.create")).await.unwrap();
    let a = store.create_deployment(&new_deployment(&web, Environment::Production), &audit("d")).await.unwrap();
    let b = store.create_deployment(&new_deployment(&web, Environment::Production), &audit("d")).await.unwrap();
    let c = store.create_deployment(&new_deployment(&api, Environment::Production), &audit("d")).await.unwrap();
    let pending = store.create_deployment(&new_deployment(&api, Environment::Staging), &audit("d")).await.unwrap();
    store.activate_deployment(&a.id, &audit("deployment.activate")).await.unwrap();
    store.activate_deployment(&b.id, &audit("deployment.activate")).await.unwrap(); // a goes to standby
    store.activate_deployment(&c.id, &audit("deployment.activate")).await.unwrap();
    store.record_requests(&[(a.id.clone(), 1234)]).await.unwrap();
    let place = |d: &str, n: &Node, memory: u32| NewInstance {
        deployment: d.to_owned(),
        node: Some(n.id.clone()),
        region: n.region.clone(),
        resources: Resources { vcpu: 1, memory },
        runtime: None,
    };
    let mut made = Vec::new();
    for (d, n, memory) in [(&b, &us, 256), (&b, &us, 256), (&b, &eu, 128), (&a, &eu, 512), (&c, &eu, 64)] {
        made.push(store.create_instance(&place(&d.id, n, memory)).await.unwrap());
    }
    store.set_instance_status(&made[0].id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
    store
        .set_instance_status(&made[4].id, InstanceStatus::Failed, None, Some((Some(1), "exit 1".into())))
        .await
        .unwrap();
    // Instances of a deployment in another status are not counted.
    store.create_instance(&place(&pending.id, &us, 1024)).await.unwrap();

    const RUNNING: [DeploymentStatus; 2] = [DeploymentStatus::Active, DeploymentStatus::Standby];
    let got = store.deployments_in(&RUNNING).await.unwrap();
    let ids: Vec<(&str, DeploymentStatus)> = got.iter().map(|(d, _)| (d.id.as_str(), d.status)).collect();
    // Active first, then standby; within each as listed (newest first).
    let mut want = Vec::new();
    for status in RUNNING {
        let f = DeploymentFilter { status: Some(status), ..Default::default() };
        want.extend(
            store.list_deployments(&f, &Page::first(10)).await.unwrap().items.into_iter().map(|d| (d.id, status)),
        );
    }
    let want: Vec<(&str, DeploymentStatus)> = want.iter().map(|(id, s)| (id.as_str(), *s)).collect();
    assert_eq!(ids, want);
    let mut active = vec![b.id.as_str(), c.id.as_str()];
    active.sort();
    let mut got_active: Vec<&str> = ids[..2].iter().map(|(id, _)| *id).collect();
    got_active.sort();
    assert_eq!((got_active, ids[2]), (active, (a.id.as_str(), DeploymentStatus::Standby)));
    for (d, w) in &got {
        assert_eq!(*w, store.wakefulness(&d.id).await.unwrap(), "{}", d.id);
        assert_eq!(*d, store.get_deployment(&d.id).await.unwrap());
    }
    assert_eq!(got[2].1.last_request_at, Some(1234));
    assert!(store.deployments_in(&[DeploymentStatus::Sleeping]).await.unwrap().is_empty());

    // The few columns of each that decide its count of instances, with its project's.
    let scaling = Scaling {
        min_per_region: 0,
        max_per_region: 4,
        target_cpu_percent: Some(60),
        target_memory_percent: None,
        target_concurrency: None,
    };
    let patch = PatchProject { scaling: Some(Some(scaling)), ..Default::default() };
    store.update_project("acme", "api", &patch, &audit("project.update")).await.unwrap();
    store.set_scale_target(&c.id, 2, &audit("deployment.scale")).await.unwrap();
    let mut lean = store.running_deployments(&RUNNING).await.unwrap();
    let newest_first: Vec<&str> = lean.iter().map(|r| r.id.as_str()).collect();
    let mut by_age: Vec<(i64, &str)> =
        got.iter().map(|(d, _)| (d.created_at.timestamp_millis(), d.id.as_str())).collect();
    by_age.sort();
    by_age.reverse();
    assert_eq!(newest_first, by_age.iter().map(|(_, id)| *id).collect::<Vec<_>>(), "newest first");
    lean.sort_by_key(|r| RUNNING.iter().position(|s| *s == r.status));
    assert_eq!(lean.iter().map(|r| (r.id.as_str(), r.status)).collect::<Vec<_>>(), ids, "as deployments_in lists them");
    for r in &lean {
        let d = store.get_deployment(&r.id).await.unwrap();
        assert_eq!((r.instances_per_region, r.updated_at), (d.instances_per_region, d.updated_at), "{}", r.id);
        assert_eq!(r.wakefulness, store.wakefulness(&r.id).await.unwrap(), "{}", r.id);
        let p = store.get_project(&d.org, &d.project).await.unwrap();
        let want = RunningProject { regions: p.regions, scaling: p.scaling, sleep_after_secs: p.sleep_after_secs };
        assert_eq!(r.project.as_ref(), Some(&want), "{}", r.id);
    }
    let api_running = lean.iter().find(|r| r.id == c.id).unwrap();
    assert_eq!(api_running.project.as_ref().and_then(|p| p.scaling), Some(scaling));
    assert_eq!(api_running.wakefulness.scale_target, Some(2));
    assert!(lean.iter().filter(|r| r.id != c.id).all(|r| r.project.as_ref().is_some_and(|p| p.scaling.is_none())));
    assert!(store.running_deployments(&[DeploymentStatus::Sleeping]).await.unwrap().is_empty());

    // The running deployments of some projects, by project id, newest first.
    let api = store.get_project("acme", "api").await.unwrap();
    let web = store.get_project("acme", "web").await.unwrap();
    let newest: Vec<String> = by_age.iter().map(|(_, id)| id.to_string()).collect();
    let of_api: Vec<String> =
        newest.iter().filter(|id| got.iter().any(|(d, _)| &d.id == *id && d.project == "api")).cloned().collect();
    assert!(!of_api.is_empty() && of_api.len() < newest.len());
    assert_eq!(store.deployments_of_projects(std::slice::from_ref(&api.id), &RUNNING).await.unwrap(), of_api);
    assert_eq!(store.deployments_of_projects(&[api.id.clone(), web.id], &RUNNING).await.unwrap(), newest);
    assert!(store.deployments_of_projects(&[api.id], &[DeploymentStatus::Sleeping]).await.unwrap().is_empty());
    assert!(store.deployments_of_projects(&[], &RUNNING).await.unwrap().is_empty());

    let projects = store.projects_of_deployments_in(&RUNNING).await.unwrap();
    let mut names: Vec<&str> = projects.keys().map(|(_, name)| name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["api", "web"], "only projects with a running deployment");
    assert_eq!(projects[&("acme".to_owned(), "web".to_owned())], store.get_project("acme", "web").await.unwrap());

    let tallies = store.instance_tallies(&RUNNING).await.unwrap();
    let mut seen: Vec<(String, String, InstanceStatus, u32)> =
        tallies.into_iter().map(|t| (t.deployment, t.region, t.status, t.count)).collect();
    seen.sort_by(|x, y| (&x.0, &x.1, x.2.as_str()).cmp(&(&y.0, &y.1, y.2.as_str())));
    let mut want = vec![
        (b.id.clone(), "us-east".to_owned(), InstanceStatus::Ready, 1),
        (b.id.clone(), "us-east".to_owned(), InstanceStatus::Pending, 1),
        (b.id.clone(), "eu-west".to_owned(), InstanceStatus::Pending, 1),
        (a.id.clone(), "eu-west".to_owned(), InstanceStatus::Pending, 1),
        (c.id.clone(), "eu-west".to_owned(), InstanceStatus::Failed, 1),
    ];
    want.sort_by(|x, y| (&x.0, &x.1, x.2.as_str()).cmp(&(&y.0, &y.1, y.2.as_str())));
    assert_eq!(seen, want);

    // Every node, as listed one by one, with what its live instances hold.
    let nodes = store.nodes_for_placement().await.unwrap();
    let listed = store.list_nodes(&Page::first(10)).await.unwrap().items;
    assert_eq!(nodes, listed);
    let by_id = |id: &str| nodes.iter().find(|n| n.id == id).unwrap().clone();
    assert_eq!((by_id(&us.id).instances, by_id(&us.id).allocated), (3, Capacity { vcpu: 3, memory: 1536 }));
    // The failed instance holds nothing.
    assert_eq!((by_id(&eu.id).instances, by_id(&eu.id).allocated), (2, Capacity { vcpu: 2, memory: 640 }));
    assert_eq!((by_id(&idle.id).instances, by_id(&idle.id).allocated), (0, Capacity { vcpu: 0, memory: 0 }));

    // What each node holds is kept as its instances change, the same before and
    // after the pending deltas are folded into the nodes.
    let holds = |ns: Vec<Node>| ns.into_iter().map(|n| (n.id, n.instances, n.allocated)).collect::<Vec<_>>();
    assert!(store.fold_node_holds().await.unwrap() >= 2, "both nodes with instances take their deltas");
    assert_eq!(holds(store.nodes_for_placement().await.unwrap()), holds(nodes.clone()));
    assert_eq!(store.fold_node_holds().await.unwrap(), 0, "nothing is folded twice");
    store.set_instance_status(&made[1].id, InstanceStatus::Stopped, None, None).await.unwrap();
    // Readiness changes nothing a node holds.
    store.set_instance_status(&made[2].id, InstanceStatus::Ready, Some("10.0.0.3:8080"), None).await.unwrap();
    assert!(store.retire_instance(&made[3].id, "gone").await.unwrap());
    let want = |n: &Node| match n.id.as_str() {
        id if id == us.id => (2, Capacity { vcpu: 2, memory: 1280 }),
        id if id == eu.id => (1, Capacity { vcpu: 1, memory: 128 }),
        _ => (0, Capacity { vcpu: 0, memory: 0 }),
    };
    for fold in [false, true] {
        if fold {
            store.fold_node_holds().await.unwrap();
        }
        for n in store.nodes_for_placement().await.unwrap() {
            assert_eq!((n.instances, n.allocated), want(&n), "{} (folded: {fold})", n.hostname);
            assert_eq!(store.get_node(&n.id).await.unwrap(), n);
        }
    }
}

fn drain(org: &str, sources: &[&str]) -> StoredLogDrain {
    StoredLogDrain {
        id: log_drain_id(),
        org: org.into(),
        kind: "http-json".into(),
        target_enc: format!("sealed-url-of-{org}"),
        token_enc: Some("sealed-token".into()),
        ca: None,
        sources: sources.iter().map(|s| s.to_string()).collect(),
        created_at: chrono::Utc::now(),
    }
}

async fn log_drains(store: Store) {
    org(&store, "acme").await;
    org(&store, "other").await;
    let mut changes = store.changes();
    changes.mark_unchanged();
    let a = store.create_log_drain(&drain("acme", &["app", "audit"]), &audit("log_drain.create")).await.unwrap();
    // A new drain changes what node agents are assigned: their long polls wake.
    assert!(changes.has_changed().unwrap(), "creating a drain announces a change");
    assert_eq!(a.sources, ["app", "audit"]);
    assert!(a.takes("audit") && !a.takes("build"));
    assert_eq!(a.token_enc.as_deref(), Some("sealed-token"));
    let b = store.create_log_drain(&drain("other", &["build"]), &audit("log_drain.create")).await.unwrap();
    let ids = |v: Vec<StoredLogDrain>| v.into_iter().map(|d| d.id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_log_drains(Some("acme")).await.unwrap()), vec![a.id.clone()]);
    assert_eq!(ids(store.list_log_drains(None).await.unwrap()).len(), 2);
    // One organisation cannot delete another's drain.
    let e = store.delete_log_drain("acme", &b.id, &audit("log_drain.delete")).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound(_)), "{e}");
    store.delete_log_drain("other", &b.id, &audit("log_drain.delete")).await.unwrap();
    assert!(matches!(store.log_drain(&b.id).await, Err(StoreError::NotFound(_))));
    // At most MAX_LOG_DRAINS per organisation.
    for _ in 1..MAX_LOG_DRAINS {
        store.create_log_drain(&drain("acme", &["app"]), &audit("log_drain.create")).await.unwrap();
    }
    let e = store.create_log_drain(&drain("acme", &["app"]), &audit("log_drain.create")).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e}");
}

/// What orgs used, from samples of their instances: CPU time adds up over
/// samples (and across a restart of an instance's counter) and over instances
/// that are gone; memory counts live instances at their latest sample;
/// instance time runs from an instance's start to its latest sample.
async fn instance_usage_from_samples(store: Store) {
    store.create_region(&region("eu-west"), &audit("region.create")).await.unwrap();
    let (n, _) = store.register_node(&node("w1", "eu-west"), &audit("node.register")).await.unwrap();
    org(&store, "acme").await;
    org(&store, "beta").await;
    let web = store.create_project(&new_project("acme", "web"), &audit("project.create")).await.unwrap();
    let api = store.create_project(&new_project("beta", "api"), &audit("project.create")).await.unwrap();
    let a = store.create_deployment(&new_deployment(&web, Environment::Production), &audit("d")).await.unwrap();
    let b = store.create_deployment(&new_deployment(&api, Environment::Production), &audit("d")).await.unwrap();
    let place = |d: &str| NewInstance {
        deployment: d.to_owned(),
        node: Some(n.id.clone()),
        region: n.region.clone(),
        resources: Resources { vcpu: 1, memory: 256 },
        runtime: None,
    };
    let (i1, i2, i3) = (
        store.create_instance(&place(&a.id)).await.unwrap(),
        store.create_instance(&place(&a.id)).await.unwrap(),
        store.create_instance(&place(&b.id)).await.unwrap(),
    );
    let mut ready = Vec::new();
    for i in [&i1, &i2, &i3] {
        store.set_instance_status(&i.id, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
        ready.push(store.get_instance(&i.id).await.unwrap().ready_at.unwrap().timestamp_millis());
    }
    let sample = |i: &Instance, at: i64, cpu_ms: i64, mib: i64| UsageSample {
        instance: i.id.clone(),
        cpu_ms,
        memory_bytes: mib << 20,
        at,
    };
    store
        .record_usage(&[sample(&i1, ready[0] + 60_000, 1_500, 100), sample(&i2, ready[1] + 60_000, 2_000, 50)])
        .await
        .unwrap();
    store
        .record_usage(&[
            sample(&i1, ready[0] + 120_000, 4_000, 120),
            // i2 restarted: its counter begins again at zero.
            sample(&i2, ready[1] + 90_000, 500, 40),
            sample(&i3, ready[2] + 3_600_000, 10_000, 10),
            // An instance the store does not know is skipped.
            UsageSample { instance: "inst_unknown".into(), cpu_ms: 99, memory_bytes: 99, at: ready[2] },
        ])
        .await
        .unwrap();
    store.set_instance_status(&i2.id, InstanceStatus::Stopped, None, None).await.unwrap();

    let all = store.usage_by_org(None).await.unwrap();
    assert_eq!(
        all,
        [
            OrgUsage {
                org: "acme".into(),
                cpu_ms: 4_000 + 2_000 + 500,
                memory_bytes: 120 << 20,
                instance_ms: 120_000 + 90_000,
                samples: 4,
                last_sample_at: Some((ready[0] + 120_000).max(ready[1] + 90_000)),
            },
            OrgUsage {
                org: "beta".into(),
                cpu_ms: 10_000,
                memory_bytes: 10 << 20,
                instance_ms: 3_600_000,
                samples: 1,
                last_sample_at: Some(ready[2] + 3_600_000),
            },
        ]
    );
    let beta = store.usage_by_org(Some("beta")).await.unwrap();
    assert_eq!(beta, all[1..]);
    assert!(store.usage_by_org(Some("nobody")).await.unwrap().is_empty());
    let mut sampled: Vec<String> = store.ready_instances().await.unwrap().into_iter().map(|i| i.id).collect();
    sampled.sort();
    let mut want = [i1.id.clone(), i3.id.clone()];
    want.sort();
    assert_eq!(sampled, want, "the stopped one is not sampled any more");

    // Rows of instances not sampled since `before` go, a batch at a time; the others stay.
    let before = (ready[0] + 120_000).max(ready[1] + 90_000) + 1;
    assert!(before <= ready[2] + 3_600_000, "beta's instance was sampled last");
    assert_eq!(store.prune_usage(before, 1).await.unwrap(), 1);
    assert_eq!(store.prune_usage(before, 1).await.unwrap(), 1);
    assert_eq!(store.prune_usage(before, 1).await.unwrap(), 0, "nothing else is that old");
    assert_eq!(store.usage_by_org(None).await.unwrap(), all[1..]);
}
