use super::*;

fn route(host: &str, deployment: &str) -> Route {
    Route {
        acme: false,
        host: host.into(),
        deployment: deployment.into(),
        org: "acme".into(),
        project: "web".into(),
        environment: None,
        rate_limit: None,
        instances: vec![RouteInstance { id: format!("ins-{deployment}"), upstream: "http://n:1".into() }],
        wake: false,
        gone: false,
        served: vec![],
        skew_max_age_secs: None,
        canary: None,
        shadow: None,
    }
}

fn table(version: &str, routes: &[(&str, &str)]) -> RoutingTable {
    RoutingTable {
        version: version.into(),
        apps_domain: "apps.test".into(),
        routes: routes.iter().map(|(h, d)| route(h, d)).collect(),
    }
}

#[tokio::test]
async fn edges_get_a_snapshot_then_only_what_changed() {
    let hub = RoutingHub::new("apps.test");
    hub.publish(table("v1", &[("a.apps.test", "d1"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
    let first = hub.deltas(None, Duration::from_secs(1)).await;
    assert!(first.snapshot);
    assert_eq!(first.routes.len(), 3);
    assert_eq!(first.version, "v1");

    // A switch of `a`, `c` gone, `d` new; `b` unchanged is not sent again.
    hub.publish(table("v2", &[("a.apps.test", "d3"), ("b.apps.test", "d1"), ("d.apps.test", "d3")]));
    let next = hub.deltas(Some(&first.cursor), Duration::from_secs(1)).await;
    assert!(!next.snapshot);
    assert_eq!(next.version, "v2");
    let set: Vec<(&str, &str)> = next.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
    assert_eq!(set, [("a.apps.test", "d3"), ("d.apps.test", "d3")]);
    assert_eq!(next.removed, ["c.apps.test"]);

    // Two changes behind: merged into one answer, the later change winning.
    hub.publish(table("v3", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("d.apps.test", "d3")]));
    hub.publish(table("v4", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
    let merged = hub.deltas(Some(&next.cursor), Duration::from_secs(1)).await;
    assert!(!merged.snapshot);
    let set: Vec<(&str, &str)> = merged.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
    assert_eq!(set, [("a.apps.test", "d4"), ("c.apps.test", "d2")]);
    assert_eq!(merged.removed, ["d.apps.test"]);
    assert_eq!(merged.version, "v4");

    // The same table again is no change.
    hub.publish(table("v4", &[("a.apps.test", "d4"), ("b.apps.test", "d1"), ("c.apps.test", "d2")]));
    assert_eq!(hub.deltas(None, Duration::from_secs(1)).await.cursor, merged.cursor);
}

#[tokio::test]
async fn a_cursor_it_cannot_resume_from_gets_the_whole_table() {
    let hub = RoutingHub::new("apps.test");
    hub.publish(table("v0", &[("a.apps.test", "d0")]));
    let old = hub.deltas(None, Duration::from_secs(1)).await;
    // Further behind than the log reaches.
    for i in 1..=LOG_LEN + 1 {
        hub.publish(table(&format!("v{i}"), &[("a.apps.test", &format!("d{i}"))]));
    }
    let behind = hub.deltas(Some(&old.cursor), Duration::from_secs(1)).await;
    assert!(behind.snapshot, "a gap is answered with the whole table");
    assert_eq!(behind.routes[0].deployment, format!("d{}", LOG_LEN + 1));
    // Another operator's (or a restarted one's) cursor, or nonsense.
    let seq = behind.cursor.split_once('.').unwrap().1;
    for cursor in [format!("other.{seq}"), "garbage".to_owned(), format!("{}.999999", hub.epoch)] {
        let d = hub.deltas(Some(&cursor), Duration::from_secs(1)).await;
        assert!(d.snapshot, "{cursor} is not resumable");
        assert_eq!(d.routes.len(), 1);
    }
    // The newest cursor is resumable.
    hub.publish(table("vx", &[("b.apps.test", "dx")]));
    let d = hub.deltas(Some(&behind.cursor), Duration::from_secs(1)).await;
    assert!(!d.snapshot);
    assert_eq!(d.removed, ["a.apps.test"]);
}

#[tokio::test]
async fn a_waiting_edge_is_answered_by_the_change() {
    let hub = RoutingHub::new("apps.test");
    hub.publish(table("v1", &[("a.apps.test", "d1")]));
    let at = hub.deltas(None, Duration::from_secs(1)).await.cursor;
    let waiting = tokio::spawn({
        let hub = hub.clone();
        async move { hub.deltas(Some(&at), Duration::from_secs(60)).await }
    });
    tokio::task::yield_now().await;
    hub.publish(table("v2", &[("a.apps.test", "d2")]));
    let d = waiting.await.unwrap();
    assert!(!d.snapshot);
    assert_eq!(d.routes[0].deployment, "d2");
}

/// A store with region `eu`, one node, org `acme` and the projects named.
async fn store_with(projects: &[&str]) -> (tempfile::TempDir, Store, String, Vec<zeitwork_api_types::Project>) {
    use zeitwork_api_types::{Capacity, CreateRegion, RegisterNode, Resources};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
    let a = || zeitwork_store::Audit::new("test", "test", "x");
    let region = CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() };
    store.create_region(&region, &a()).await.unwrap();
    let reg = RegisterNode {
        hostname: "n1".into(),
        region: "eu".into(),
        address: "http://127.0.0.1:1".into(),
        capacity: Capacity { vcpu: 64, memory: 65536 },
        physical: None,
        runtime: Some("container".into()),
        runtime_detail: None,
        tunnel: None,
    };
    let (node, _) = store.register_node(&reg, &a()).await.unwrap();
    store.create_org("acme", "acme", None, &a()).await.unwrap();
    let mut made = Vec::new();
    for name in projects {
        let p = zeitwork_store::NewProject {
            resources: Resources { vcpu: 1, memory: 128 },
            ..zeitwork_store::NewProject::named("acme", name)
        };
        made.push(store.create_project(&p, &a()).await.unwrap());
    }
    (dir, store, node.id, made)
}

/// A new deployment of `p` in `env`, with one instance on `node`.
async fn deploy(store: &Store, p: &zeitwork_api_types::Project, env: Environment, node: &str) -> (String, String) {
    let id = format!("{}-{}-acme", p.name, zeitwork_store::nanoid(7));
    let new = zeitwork_store::NewDeployment {
        environment: env,
        url: format!("http://{id}.apps.test"),
        ..zeitwork_store::NewDeployment::of(p, &id, "registry.example.com/web:1")
    };
    store.create_deployment(&new, &zeitwork_store::Audit::new("test", "test", "x")).await.unwrap();
    let i = store
        .create_instance(&zeitwork_store::NewInstance {
            deployment: id.clone(),
            node: Some(node.to_owned()),
            region: "eu".into(),
            resources: p.resources,
            runtime: None,
        })
        .await
        .unwrap();
    (id, i.id)
}

fn audit() -> zeitwork_store::Audit {
    zeitwork_store::Audit::new("test", "test", "x")
}

/// A switch of one project is read for that project only and reaches
/// edges as exactly its routes; the table is the one a whole rebuild gives.
#[tokio::test]
async fn a_change_to_one_project_is_applied_as_exactly_its_delta() {
    use zeitwork_api_types::InstanceStatus;
    let (_dir, store, node, projects) = store_with(&["web", "api"]).await;
    for p in &projects {
        let (d, i) = deploy(&store, p, Environment::Production, &node).await;
        store.set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
        store.activate_deployment(&d, &audit()).await.unwrap();
    }
    let hub = RoutingHub::new("apps.test");
    let mut seen = 0;
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap(), Refreshed::Rebuilt);
    let at = hub.deltas(None, Duration::from_secs(1)).await;
    assert_eq!(at.routes.len(), 4, "{:?}", at.routes);
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Unchanged);

    let (d, i) = deploy(&store, &projects[0], Environment::Production, &node).await;
    store.set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.3:8080"), None).await.unwrap();
    store.activate_deployment(&d, &audit()).await.unwrap();
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
    let delta = hub.deltas(Some(&at.cursor), Duration::from_secs(1)).await;
    assert!(!delta.snapshot);
    let set: Vec<(&str, &str)> = delta.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
    let own = format!("{d}.apps.test");
    let mut want = vec![(own.as_str(), d.as_str()), ("web-acme.apps.test", d.as_str())];
    want.sort();
    assert_eq!(set, want);
    assert!(delta.removed.is_empty(), "{:?}", delta.removed);
    assert_eq!(hub.current().routes, build(&store.routing_rows().await.unwrap(), "apps.test"));

    // A verified custom domain of the other project: that one route.
    let at = delta.cursor;
    store.create_domain(&projects[1].id, "api.example.com", Environment::Production, &audit()).await.unwrap();
    store.verify_domain(&projects[1].id, "api.example.com", &audit()).await.unwrap();
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
    let delta = hub.deltas(Some(&at), Duration::from_secs(1)).await;
    let hosts: Vec<&str> = delta.routes.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts, ["api.example.com"]);
    assert_eq!(hub.current().routes, build(&store.routing_rows().await.unwrap(), "apps.test"));
}

/// After any sequence of changes, the table kept by applying changes is
/// the table a whole rebuild gives (pseudo-random sequences, fixed seeds).
#[tokio::test]
async fn applying_changes_gives_what_a_whole_rebuild_gives() {
    use zeitwork_api_types::InstanceStatus;
    for seed in [1u64, 7, 42, 2026] {
        let (_dir, store, node, projects) = store_with(&["web", "api", "docs"]).await;
        let hub = RoutingHub::new("apps.test");
        let mut seen = 0;
        hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap();
        let mut rng = seed;
        let mut next = |n: usize| {
            // xorshift64
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut deployments: Vec<(String, String)> = Vec::new();
        let mut applied = 0;
        for step in 0..60 {
            let p = &projects[next(projects.len())];
            let pick =
                |deployments: &[(String, String)], k: usize| deployments.get(k % deployments.len().max(1)).cloned();
            let op = next(7);
            let k = next(1000);
            let what = match op {
                0 => {
                    let env = [Environment::Production, Environment::Staging][next(2)];
                    deployments.push(deploy(&store, p, env, &node).await);
                    "deploy"
                }
                1 => {
                    if let Some((_, i)) = pick(&deployments, k) {
                        store
                            .set_instance_status(&i, InstanceStatus::Ready, Some("10.0.0.9:8080"), None)
                            .await
                            .unwrap();
                    }
                    "ready"
                }
                2 => {
                    if let Some((d, _)) = pick(&deployments, k) {
                        // Refused for a deployment retired meanwhile: that changes nothing.
                        store.activate_deployment(&d, &audit()).await.ok();
                    }
                    "activate"
                }
                3 => {
                    if let Some((d, _)) = pick(&deployments, k) {
                        store.sleep_deployment(&d, "test", &audit()).await.unwrap();
                    }
                    "sleep"
                }
                4 => {
                    if let Some((_, i)) = pick(&deployments, k) {
                        store.retire_instance(&i, "test").await.unwrap();
                    }
                    "retire instance"
                }
                5 => {
                    let name = format!("{}-{}.example.com", p.name, k % 3);
                    if store.create_domain(&p.id, &name, Environment::Production, &audit()).await.is_ok() {
                        store.verify_domain(&p.id, &name, &audit()).await.unwrap();
                    }
                    "domain"
                }
                _ => {
                    if let Some((d, _)) = pick(&deployments, k) {
                        store.retire_deployment(&d, "test", &audit()).await.ok();
                    }
                    "retire"
                }
            };
            if hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap() == Refreshed::Applied {
                applied += 1;
            }
            let whole = build(&store.routing_rows().await.unwrap(), "apps.test");
            assert_eq!(hub.current().routes, whole, "seed {seed}, step {step} ({what})");
        }
        assert!(applied > 20, "seed {seed}: only {applied} changes were applied without a whole rebuild");
    }
}

/// `web` with two production deployments, each with a ready instance, the
/// second active, and the projects named besides with one each; a hub that
/// has read it whole.
async fn two_deployments_of_web(others: &[&str]) -> (tempfile::TempDir, Store, Arc<RoutingHub>, u64, (String, String)) {
    use zeitwork_api_types::InstanceStatus;
    let mut names = vec!["web"];
    names.extend_from_slice(others);
    let (dir, store, node, projects) = store_with(&names).await;
    let mut web = Vec::new();
    for (i, p) in projects.iter().enumerate() {
        let rounds = if i == 0 { 2 } else { 1 };
        for _ in 0..rounds {
            let (d, ins) = deploy(&store, p, Environment::Production, &node).await;
            store.set_instance_status(&ins, InstanceStatus::Ready, Some("10.0.0.2:8080"), None).await.unwrap();
            store.activate_deployment(&d, &audit()).await.unwrap();
            if i == 0 {
                web.push(d);
            }
        }
    }
    let hub = RoutingHub::new("apps.test");
    let mut seen = 0;
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap(), Refreshed::Rebuilt);
    (dir, store, hub, seen, (web[0].clone(), web[1].clone()))
}

/// A rollback is read for its project only and patched in place: the delta
/// holds only the host that switched, every other route is the very same
/// one as before (nothing copied), and the version moves on by one change.
#[tokio::test]
async fn a_rollback_is_patched_in_place_as_only_its_routes() {
    let (_dir, store, hub, mut seen, (first, _second)) = two_deployments_of_web(&["api", "docs", "blog", "shop"]).await;
    let before: BTreeMap<String, Arc<Route>> = hub.read().hosts.clone();
    let at = hub.deltas(None, Duration::from_secs(1)).await;
    assert_eq!(at.routes.len(), 2 * 4 + 3, "{:?}", at.routes.iter().map(|r| &r.host).collect::<Vec<_>>());

    store.point_environment(&first, Environment::Production, &audit()).await.unwrap();
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
    let delta = hub.deltas(Some(&at.cursor), Duration::from_secs(1)).await;
    assert!(!delta.snapshot);
    let set: Vec<(&str, &str)> = delta.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
    assert_eq!(set, [("web-acme.apps.test", first.as_str())]);
    assert!(delta.removed.is_empty(), "{:?}", delta.removed);
    assert_ne!(delta.version, at.version);
    let seq = |cursor: &str| cursor.split_once('.').unwrap().1.parse::<u64>().unwrap();
    assert_eq!(seq(&delta.cursor), seq(&at.cursor) + 1);

    let after = hub.read().hosts.clone();
    for (host, route) in &before {
        if host != "web-acme.apps.test" {
            assert!(Arc::ptr_eq(route, &after[host]), "{host} was replaced by a change that did not touch it");
        }
    }
    assert_eq!(hub.current().routes, build(&store.routing_rows().await.unwrap(), "apps.test"));
}

/// After many changes applied in place, reading the whole table finds
/// nothing to change: the patched table is the one a whole read gives.
#[tokio::test]
async fn a_whole_read_after_many_changes_in_place_changes_nothing() {
    let (_dir, store, hub, mut seen, (first, second)) = two_deployments_of_web(&["api", "docs"]).await;
    let api = store.get_project("acme", "api").await.unwrap();
    let mut applied = 0;
    for round in 0..40 {
        let to = if round % 2 == 0 { &first } else { &second };
        store.point_environment(to, Environment::Production, &audit()).await.unwrap();
        if round % 5 == 0 {
            let name = format!("api-{round}.example.com");
            store.create_domain(&api.id, &name, Environment::Production, &audit()).await.unwrap();
            store.verify_domain(&api.id, &name, &audit()).await.unwrap();
        }
        if hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap() == Refreshed::Applied {
            applied += 1;
        }
    }
    assert_eq!(applied, 40);
    let at = hub.deltas(None, Duration::from_secs(1)).await;
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, true).await.unwrap(), Refreshed::Rebuilt);
    let again = hub.deltas(Some(&at.cursor), Duration::from_millis(10)).await;
    assert_eq!(again.cursor, at.cursor, "the whole read changed {:?} / removed {:?}", again.routes, again.removed);
    assert_eq!(hub.current().routes, build(&store.routing_rows().await.unwrap(), "apps.test"));
}

/// A whole read begun before a change and finished after it was applied in
/// place does not undo it; what it found for projects not read again since
/// is still published.
#[tokio::test]
async fn a_whole_read_begun_before_a_change_does_not_undo_it() {
    let (_dir, store, hub, mut seen, (first, second)) = two_deployments_of_web(&["api"]).await;
    // A domain of each project the hub is not told of: only a whole read finds them.
    for (project, domain) in [("web", "www.example.com"), ("api", "api.example.com")] {
        let p = store.get_project("acme", project).await.unwrap();
        store.create_domain(&p.id, domain, Environment::Production, &audit()).await.unwrap();
        store.verify_domain(&p.id, domain, &audit()).await.unwrap();
    }
    seen = store.changes_since(seen).0;
    // A whole read, which sees `second` serving web…
    let mark = *store.changes().borrow();
    let read = hub.compare_whole(&store.routing_rows().await.unwrap(), "apps.test", mark);
    let differ: Vec<&str> = read.differ.iter().map(|(k, _)| k.1.as_str()).collect();
    assert_eq!(differ.len(), 2, "{differ:?}");
    // …ends after a rollback of web was applied in place.
    store.point_environment(&first, Environment::Production, &audit()).await.unwrap();
    assert_eq!(hub.refresh(&store, "apps.test", &mut seen, false).await.unwrap(), Refreshed::Applied);
    let serves = |hub: &RoutingHub, host: &str| hub.read().hosts[host].deployment.clone();
    assert_eq!(serves(&hub, "web-acme.apps.test"), first);
    let at = hub.deltas(None, Duration::from_secs(1)).await;
    assert!(!hub.apply_whole(read), "no host is contested");
    assert_eq!(serves(&hub, "web-acme.apps.test"), first, "the older whole read undid the rollback");
    assert_eq!(serves(&hub, "www.example.com"), first);
    assert_ne!(first, second);
    let delta = hub.deltas(Some(&at.cursor), Duration::from_secs(1)).await;
    let hosts: Vec<&str> = delta.routes.iter().map(|r| r.host.as_str()).collect();
    assert_eq!(hosts, ["api.example.com"], "only what the whole read found for api is published");
    assert!(delta.removed.is_empty());
    assert_eq!(hub.current().routes, build(&store.routing_rows().await.unwrap(), "apps.test"));
}

/// Before the first whole read the table is not known: answers wait for it
/// rather than hand edges an empty table.
#[tokio::test]
async fn answers_wait_for_the_first_whole_read() {
    let hub = RoutingHub::new("apps.test");
    assert!(!hub.ready(Duration::from_millis(20)).await);
    let waiting = tokio::spawn({
        let hub = hub.clone();
        async move { hub.ready(Duration::from_secs(10)).await }
    });
    hub.publish(table("v1", &[("a.apps.test", "d1")]));
    assert!(waiting.await.unwrap());
    assert!(hub.ready(Duration::from_millis(1)).await);
}

/// The running hub: a change reaches a waiting edge at once (without
/// waiting for a whole read), a whole read on request changes nothing when
/// nothing differs, and the whole-table watch follows the version.
#[tokio::test]
async fn the_running_hub_applies_a_change_at_once() {
    let (_dir, store, _, _, (first, second)) = two_deployments_of_web(&["api"]).await;
    let hub = RoutingHub::new("apps.test");
    let (stop, stopped) = watch::channel(false);
    let running = tokio::spawn(hub.clone().run(store.clone(), "apps.test".into(), stopped));
    assert!(hub.ready(Duration::from_secs(10)).await);
    let at = hub.deltas(None, Duration::from_secs(1)).await;
    assert!(at.snapshot);
    assert!(at.routes.iter().any(|r| r.host == "web-acme.apps.test" && r.deployment == second));

    let waiting = tokio::spawn({
        let (hub, cursor) = (hub.clone(), at.cursor.clone());
        async move { hub.deltas(Some(&cursor), Duration::from_secs(30)).await }
    });
    let watching = tokio::spawn({
        let (hub, version) = (hub.clone(), at.version.clone());
        async move { hub.watch(&version, Duration::from_secs(30)).await }
    });
    tokio::task::yield_now().await;
    let started = std::time::Instant::now();
    store.point_environment(&first, Environment::Production, &audit()).await.unwrap();
    let delta = waiting.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    let set: Vec<(&str, &str)> = delta.routes.iter().map(|r| (r.host.as_str(), r.deployment.as_str())).collect();
    assert_eq!(set, [("web-acme.apps.test", first.as_str())]);
    let table = watching.await.unwrap();
    assert_eq!(table.version, delta.version);
    assert!(table.routes.iter().any(|r| r.host == "web-acme.apps.test" && r.deployment == first));

    // Read whole on request: nothing differs, so nothing is published.
    hub.changed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = hub.deltas(Some(&delta.cursor), Duration::from_millis(10)).await;
    assert_eq!(after.cursor, delta.cursor);
    assert_eq!(hub.routes_of("acme", "web").len(), 3);
    stop.send_replace(true);
    running.await.unwrap();
}
