use super::*;
use std::time::Duration;

fn traffic(ok: u64, failed: u64, ms: u64) -> DeploymentTraffic {
    let mut t = DeploymentTraffic::default();
    for _ in 0..ok {
        t.observe(200, Duration::from_millis(ms));
    }
    for _ in 0..failed {
        t.observe(500, Duration::from_millis(ms));
    }
    t
}

fn regressed(v: &Verdict) -> bool {
    matches!(v, Verdict::Regressed(_))
}

fn slower(v: &Verdict) -> bool {
    matches!(v, Verdict::Slower(_))
}

#[test]
fn too_few_requests_decide_nothing() {
    let s = AutoRollback::default();
    let (v, a) = analyse(&traffic(0, 49, 5), &traffic(1000, 0, 5), &s);
    assert_eq!(v, Verdict::Insufficient);
    assert_eq!(a.verdict, "insufficient");
    // Silence (an edge that stopped reporting) is not a regression either.
    assert_eq!(analyse(&DeploymentTraffic::default(), &traffic(1000, 0, 5), &s).0, Verdict::Insufficient);
}

#[test]
fn errors_must_pass_the_threshold_and_double_the_baseline() {
    let s = AutoRollback::default();
    // 10 % against 0 %: regressed.
    let (v, _) = analyse(&traffic(90, 10, 5), &traffic(1000, 0, 5), &s);
    assert!(regressed(&v), "{v:?}");
    // 4 % is below the 5 % threshold.
    assert_eq!(analyse(&traffic(96, 4, 5), &traffic(1000, 0, 5), &s).0, Verdict::Healthy);
    // 10 % against a baseline of 6 %: not twice as bad.
    assert_eq!(analyse(&traffic(90, 10, 5), &traffic(940, 60, 5), &s).0, Verdict::Healthy);
    // 30 % against 6 %: regressed.
    assert!(regressed(&analyse(&traffic(70, 30, 5), &traffic(940, 60, 5), &s).0));
    // A baseline with too few requests counts as error-free.
    assert!(regressed(&analyse(&traffic(90, 10, 5), &traffic(3, 3, 5), &s).0));
    // The message says what was seen.
    let Verdict::Regressed(why) = analyse(&traffic(0, 100, 5), &traffic(100, 0, 5), &s).0 else { panic!() };
    assert!(why.contains("5xx rate 100.0 %") && why.contains("100 requests"), "{why}");
}

#[test]
fn latency_must_pass_the_factor_and_the_floor() {
    let s = AutoRollback::default();
    assert!(slower(&analyse(&traffic(100, 0, 300), &traffic(100, 0, 50), &s).0));
    assert_eq!(analyse(&traffic(100, 0, 80), &traffic(100, 0, 50), &s).0, Verdict::Healthy);
    // 3 ms against 1 ms is three times, but below the floor: noise.
    assert_eq!(analyse(&traffic(100, 0, 3), &traffic(100, 0, 1), &s).0, Verdict::Healthy);
    // Without a baseline's latency there is nothing to compare with.
    assert_eq!(analyse(&traffic(100, 0, 3000), &traffic(10, 0, 5), &s).0, Verdict::Healthy);
    let strict = AutoRollback { latency_factor: 1.2, ..Default::default() };
    assert!(slower(&analyse(&traffic(100, 0, 80), &traffic(100, 0, 50), &strict).0));
}

#[test]
fn errors_act_at_once_and_a_slower_p95_once_it_held_a_window() {
    let s = AutoRollback::default();
    let t0 = chrono::Utc::now();
    let (v, a) = analyse(&traffic(0, 100, 5), &traffic(100, 0, 5), &s);
    assert!(settle(v, a, None, t0, s.window_secs).0.is_some(), "errors: at once");
    let slow = || analyse(&traffic(100, 0, 300), &traffic(100, 0, 50), &s);
    let (v, a) = slow();
    let (go, first) = settle(v, a, None, t0, s.window_secs);
    assert!(go.is_none());
    assert_eq!((first.verdict.as_str(), first.slower_since), ("slower", Some(t0)));
    let (v, a) = slow();
    let (go, second) = settle(v, a, Some(&first), t0 + chrono::Duration::seconds(10), s.window_secs);
    assert!(go.is_none(), "10 s of 30");
    assert_eq!(second.slower_since, Some(t0), "held since the first");
    let (v, a) = slow();
    let (go, third) = settle(v, a, Some(&second), t0 + chrono::Duration::seconds(31), s.window_secs);
    assert!(go.as_deref().unwrap_or("").contains("for 31 s"), "{go:?}");
    assert_eq!(third.verdict, "regressed");
    // A healthy window in between starts the count again.
    let (v, a) = analyse(&traffic(100, 0, 50), &traffic(100, 0, 50), &s);
    let (_, healthy) = settle(v, a, Some(&second), t0 + chrono::Duration::seconds(20), s.window_secs);
    let (v, a) = slow();
    let (go, again) = settle(v, a, Some(&healthy), t0 + chrono::Duration::seconds(40), s.window_secs);
    assert!(go.is_none());
    assert_eq!(again.slower_since, Some(t0 + chrono::Duration::seconds(40)));
}

#[test]
fn two_edges_add_up() {
    let s = AutoRollback::default();
    // Each edge alone saw too few requests; together they decide.
    let (a, b) = (traffic(0, 30, 5), traffic(0, 30, 5));
    assert_eq!(analyse(&a, &traffic(100, 0, 5), &s).0, Verdict::Insufficient);
    let mut both = a.clone();
    both.merge(&b);
    assert!(regressed(&analyse(&both, &traffic(100, 0, 5), &s).0));
}

fn dep(id: &str, status: DeploymentStatus) -> Deployment {
    Deployment {
        id: id.into(),
        org: "acme".into(),
        project: "web".into(),
        environment: Environment::Production,
        image: "x".into(),
        image_digest: None,
        commit_sha: None,
        commit_message: None,
        instances_per_region: 1,
        status,
        reason: None,
        url: "http://x".into(),
        created_by: None,
        created_at: chrono::Utc::now(),
        updated_at: chrono::Utc::now(),
        last_request_at: None,
        pull_request: None,
        build_ms: None,
        release_command: None,
        migration: false,
    }
}

/// A store with org `acme`, project `web` (region `eu`, one node) and `n` deployments of it.
async fn store_with(n: usize, rollout: Option<zeitwork_api_types::Rollout>) -> (tempfile::TempDir, Store, Vec<String>) {
    store_migrating(n, rollout, None).await
}

/// As [`store_with`], deployment `migrating` (an index) marked as migrating data.
async fn store_migrating(
    n: usize,
    rollout: Option<zeitwork_api_types::Rollout>,
    migrating: Option<usize>,
) -> (tempfile::TempDir, Store, Vec<String>) {
    use zeitwork_api_types::{Capacity, CreateRegion, RegisterNode};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("z.db")).await.unwrap();
    let a = || Audit::new("test", "test", "x");
    store
        .create_region(&CreateRegion { code: "eu".into(), name: "EU".into(), country: "DE".into() }, &a())
        .await
        .unwrap();
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
    store.register_node(&reg, &a()).await.unwrap();
    store.create_org("acme", "acme", None, &a()).await.unwrap();
    let project = zeitwork_store::NewProject {
        auto_rollback: AutoRollback { min_requests: 10, ..Default::default() },
        rollout,
        ..zeitwork_store::NewProject::named("acme", "web")
    };
    let p = store.create_project(&project, &a()).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("web-{i:07}-acme");
        let new = zeitwork_store::NewDeployment {
            migration: migrating == Some(i),
            ..zeitwork_store::NewDeployment::of(&p, &id, &format!("registry.example.com/web:{i}"))
        };
        store.create_deployment(&new, &a()).await.unwrap();
        ids.push(id);
    }
    (dir, store, ids)
}

/// What one edge reports for `id`: `ok` answers and `failed` 5xx ones.
async fn serve(store: &Store, id: &str, ok: u64, failed: u64) {
    let period = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    store
        .record_traffic("edge-1", period, &std::collections::BTreeMap::from([(id.to_owned(), traffic(ok, failed, 4))]))
        .await
        .unwrap();
}

async fn status(store: &Store, id: &str) -> DeploymentStatus {
    store.get_deployment(id).await.unwrap().status
}

/// A regression of a deployment that migrated data is not rolled back past
/// that migration: it is told, and left to a person.
#[tokio::test]
async fn a_regression_never_rolls_back_across_a_migration() {
    let (_dir, store, ids) = store_migrating(2, None, Some(1)).await;
    let (one, two) = (&ids[0], &ids[1]);
    let config = EngineConfig::default();
    on_ready(&store, &config, &store.get_deployment(one).await.unwrap()).await.unwrap();
    serve(&store, one, 100, 0).await;
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    serve(&store, two, 0, 20).await;
    pass(&store, &config).await.unwrap();
    assert_eq!(
        (status(&store, one).await, status(&store, two).await),
        (DeploymentStatus::Standby, DeploymentStatus::Active),
        "nothing moved back across the migration"
    );
    let filter = zeitwork_store::EventFilter {
        action: Some("deployment.auto_rollback".into()),
        result: Some("failed".into()),
        ..Default::default()
    };
    let told = store.list_events(&filter, &zeitwork_store::Page::first(5)).await.unwrap().items;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(told[0].detail.as_ref().unwrap()["reason"].as_str().unwrap().contains("migrated data"), "{told:?}");
    assert!(store.open_rollouts().await.unwrap().is_empty(), "the watch ends");
}

/// A regression rolls back once; the deployment rolled back to is not
/// watched, so when it does badly too nothing bounces back and forth.
#[tokio::test]
async fn a_regression_rolls_back_once_and_never_loops() {
    let (_dir, store, ids) = store_with(2, None).await;
    let (one, two) = (&ids[0], &ids[1]);
    let config = EngineConfig::default();
    on_ready(&store, &config, &store.get_deployment(one).await.unwrap()).await.unwrap();
    assert!(store.get_rollout(one).await.unwrap().is_none(), "nothing to roll back to: not watched");
    serve(&store, one, 100, 0).await;
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    assert_eq!(status(&store, two).await, DeploymentStatus::Active);
    // Healthy at first; silence and a trickle decide nothing.
    serve(&store, two, 5, 0).await;
    pass(&store, &config).await.unwrap();
    assert_eq!(status(&store, two).await, DeploymentStatus::Active);
    serve(&store, two, 0, 20).await;
    pass(&store, &config).await.unwrap();
    let bad = store.get_deployment(two).await.unwrap();
    assert_eq!(bad.status, DeploymentStatus::RolledBack);
    assert!(bad.reason.as_deref().unwrap_or("").contains("20 of 25 requests failed since the switch"), "{bad:?}");
    assert_eq!(status(&store, one).await, DeploymentStatus::Active);
    // The old one does badly too: it is not watched, nothing moves.
    serve(&store, one, 0, 100).await;
    for _ in 0..3 {
        pass(&store, &config).await.unwrap();
    }
    assert_eq!(
        (status(&store, one).await, status(&store, two).await),
        (DeploymentStatus::Active, DeploymentStatus::RolledBack)
    );
    assert!(store.open_rollouts().await.unwrap().is_empty());
    // Counted once each: two went live, one was rolled back.
    let outcomes = (config.outcomes.get(DeploymentStatus::Active), config.outcomes.get(DeploymentStatus::RolledBack));
    assert_eq!(outcomes, (2, 1));
    // And a person cannot abort it twice.
    let again =
        decide(&store, config.drain_grace, &bad, false, Audit::new("test", "rollout.abort", two)).await.unwrap();
    assert!(again.is_err(), "{again:?}");
}

/// A canary of a deployment that regresses goes back to 0 %: the
/// environment never left the deployment serving it, which keeps serving.
#[tokio::test]
async fn a_failing_canary_is_aborted_without_touching_the_environment() {
    let rollout = zeitwork_api_types::Rollout { steps: vec![10, 50, 100], step_secs: 60 };
    let (_dir, store, ids) = store_with(3, Some(rollout)).await;
    let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
    let config = EngineConfig::default();
    on_ready(&store, &config, &store.get_deployment(one).await.unwrap()).await.unwrap();
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    let r = store.get_rollout(two).await.unwrap().unwrap();
    assert_eq!((r.state, r.weight, r.baseline.as_deref()), (RolloutState::Canary, 10, Some(one.as_str())));
    assert_eq!(status(&store, two).await, DeploymentStatus::Ready);
    let canaries = store.canaries().await.unwrap();
    assert_eq!((canaries.len(), canaries[0].weight), (1, 10));
    serve(&store, one, 90, 0).await;
    serve(&store, two, 2, 10).await;
    pass(&store, &config).await.unwrap();
    let bad = store.get_deployment(two).await.unwrap();
    assert_eq!(bad.status, DeploymentStatus::RolledBack, "{bad:?}");
    assert!(bad.reason.as_deref().unwrap_or("").starts_with("canary aborted automatically: canary at 10 %"), "{bad:?}");
    assert!(store.canaries().await.unwrap().is_empty(), "the split is gone");
    assert_eq!(status(&store, one).await, DeploymentStatus::Active);
    // The next deployment rolls out against the one still serving.
    on_ready(&store, &config, &store.get_deployment(three).await.unwrap()).await.unwrap();
    let r = store.get_rollout(three).await.unwrap().unwrap();
    assert_eq!(r.baseline.as_deref(), Some(one.as_str()));
    // Promoted by hand: it takes the environment and is watched.
    let d = store.get_deployment(three).await.unwrap();
    let r = decide(&store, config.drain_grace, &d, true, Audit::new("test", "rollout.promote", three))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((r.state, r.weight), (RolloutState::Watching, 100));
    assert_eq!(
        (status(&store, three).await, status(&store, one).await),
        (DeploymentStatus::Active, DeploymentStatus::Standby)
    );
}

/// A person's abort: a canary goes back to 0 % and the environment stays
/// where it was; a watched deployment is rolled back to the one it
/// replaced. Each is recorded with who did it, and nothing is left open.
#[tokio::test]
async fn a_person_aborts_a_canary_and_a_watch() {
    let rollout = zeitwork_api_types::Rollout { steps: vec![10, 100], step_secs: 600 };
    let (_dir, store, ids) = store_with(3, Some(rollout)).await;
    let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
    let config = EngineConfig::default();
    on_ready(&store, &config, &store.get_deployment(one).await.unwrap()).await.unwrap();
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    assert_eq!(store.get_rollout(two).await.unwrap().unwrap().state, RolloutState::Canary);

    let d = store.get_deployment(two).await.unwrap();
    let r = decide(&store, config.drain_grace, &d, false, Audit::new("alice", "rollout.abort", two))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.state, RolloutState::RolledBack, "{r:?}");
    let aborted = store.get_deployment(two).await.unwrap();
    assert_eq!(aborted.status, DeploymentStatus::RolledBack);
    assert_eq!(aborted.reason.as_deref(), Some("canary aborted by alice"));
    assert!(store.canaries().await.unwrap().is_empty(), "the split is gone");
    assert_eq!(status(&store, one).await, DeploymentStatus::Active, "the environment never moved");

    // The next one is promoted, then aborted while it is watched: the
    // environment goes back to the deployment it replaced.
    on_ready(&store, &config, &store.get_deployment(three).await.unwrap()).await.unwrap();
    let d = store.get_deployment(three).await.unwrap();
    decide(&store, config.drain_grace, &d, true, Audit::new("alice", "rollout.promote", three)).await.unwrap().unwrap();
    assert_eq!(status(&store, three).await, DeploymentStatus::Active);
    let d = store.get_deployment(three).await.unwrap();
    let r = decide(&store, config.drain_grace, &d, false, Audit::new("bob", "rollout.abort", three))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.state, RolloutState::RolledBack, "{r:?}");
    let back = store.get_deployment(three).await.unwrap();
    assert_eq!(back.status, DeploymentStatus::RolledBack);
    assert_eq!(back.reason.as_deref(), Some(format!("rolled back to {one} by bob").as_str()));
    assert_eq!(status(&store, one).await, DeploymentStatus::Active);
    assert!(store.open_rollouts().await.unwrap().is_empty());
    // An aborted rollout cannot be aborted or promoted again.
    for promote in [false, true] {
        let again = decide(&store, config.drain_grace, &back, promote, Audit::new("bob", "rollout.abort", three))
            .await
            .unwrap();
        assert!(again.unwrap_err().contains("only a canary can be promoted"));
    }
}

/// A newer deployment supersedes a canary still running: one split per environment.
#[tokio::test]
async fn a_newer_deployment_supersedes_a_running_canary() {
    let rollout = zeitwork_api_types::Rollout { steps: vec![10, 100], step_secs: 600 };
    let (_dir, store, ids) = store_with(3, Some(rollout)).await;
    let config = EngineConfig::default();
    for id in &ids {
        on_ready(&store, &config, &store.get_deployment(id).await.unwrap()).await.unwrap();
    }
    let (one, two, three) = (&ids[0], &ids[1], &ids[2]);
    let r = store.get_rollout(two).await.unwrap().unwrap();
    assert_eq!((r.state, r.reason.as_deref()), (RolloutState::Done, Some(format!("superseded by {three}").as_str())));
    assert_eq!(status(&store, two).await, DeploymentStatus::Standby);
    let canaries = store.canaries().await.unwrap();
    assert_eq!(canaries.iter().map(|c| c.deployment.as_str()).collect::<Vec<_>>(), vec![three.as_str()]);
    assert_eq!(status(&store, one).await, DeploymentStatus::Active);
}

#[test]
fn only_a_running_deployment_that_was_not_rolled_back_takes_traffic_back() {
    assert!(rollback_target(Some(&dep("a", DeploymentStatus::Standby))).is_ok());
    // A rolled-back deployment is never a target: no loop between two bad ones.
    let e = rollback_target(Some(&dep("a", DeploymentStatus::RolledBack))).unwrap_err();
    assert!(e.contains("rolled_back"), "{e}");
    assert!(rollback_target(Some(&dep("a", DeploymentStatus::Sleeping))).is_err());
    assert!(rollback_target(None).is_err());
}

#[test]
fn a_shadow_stage_switches_only_when_over_ready_and_not_regressed() {
    assert_eq!(shadow_decision(None, false, true), ShadowDecision::Wait);
    assert_eq!(shadow_decision(None, true, false), ShadowDecision::Wait, "every instance must be ready");
    assert_eq!(shadow_decision(None, true, true), ShadowDecision::Switch);
    for over in [false, true] {
        match shadow_decision(Some("5xx rate 100 %".into()), over, true) {
            ShadowDecision::Block(why) => assert!(why.contains("shadow traffic: 5xx rate"), "{why}"),
            other => panic!("a regression must block the switch, got {other:?}"),
        }
    }
}

/// Copies that fail block the switch: the candidate is sent back without
/// ever serving a client, and the environment stays where it was.
#[tokio::test]
async fn a_shadow_that_regresses_is_never_switched_to() {
    let (_dir, store, ids) = store_with(2, None).await;
    let (one, two) = (&ids[0], &ids[1]);
    let config = EngineConfig::default();
    on_ready(&store, &config, &store.get_deployment(one).await.unwrap()).await.unwrap();
    serve(&store, one, 100, 0).await;
    let sh = zeitwork_api_types::Shadow { share: 50, secs: 600, all_methods: false };
    store.set_deployment_shadow(two, &sh).await.unwrap();
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    on_ready(&store, &config, &store.get_deployment(two).await.unwrap()).await.unwrap();
    assert_eq!(
        (status(&store, one).await, status(&store, two).await),
        (DeploymentStatus::Active, DeploymentStatus::Ready)
    );
    let r = store.get_rollout(two).await.unwrap().unwrap();
    assert_eq!((r.state, r.weight), (RolloutState::Shadow, 0), "no client goes to a shadow");
    let shadows = store.shadows().await.unwrap();
    assert_eq!(
        shadows.iter().map(|s| (s.deployment.as_str(), s.shadow.share)).collect::<Vec<_>>(),
        vec![(two.as_str(), 50)]
    );
    serve(&store, two, 0, 20).await;
    pass(&store, &config).await.unwrap();
    assert_eq!(
        (status(&store, one).await, status(&store, two).await),
        (DeploymentStatus::Active, DeploymentStatus::RolledBack),
        "the candidate was never switched to"
    );
    let project = store.get_project("acme", "web").await.unwrap();
    assert_eq!(project.current_deployment.get("production"), Some(one));
    let r = store.get_rollout(two).await.unwrap().unwrap();
    assert_eq!(r.state, RolloutState::RolledBack);
    let reason = r.reason.unwrap_or_default();
    assert!(reason.contains("never switched to: shadow traffic: 5xx rate"), "{reason}");
    assert!(store.shadows().await.unwrap().is_empty(), "the copies stop");
    let filter = zeitwork_store::EventFilter { action: Some("deployment.auto_rollback".into()), ..Default::default() };
    let told = store.list_events(&filter, &zeitwork_store::Page::first(5)).await.unwrap().items;
    assert!(told.iter().any(|e| e.target == *two), "audited and told through the outbox: {told:?}");
}
