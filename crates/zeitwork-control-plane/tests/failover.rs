//! Deployments through the engine with simulated node agents (API calls as
//! an agent would make them): placement, activation, and re-placement when a
//! node stops heartbeating.

mod common;
use common::until;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};

/// A registered node's id and a client acting with the node's own credential.
fn own_credential(base: &str, registered: Value) -> (String, Client) {
    let credential = registered["credential"].as_str().expect("a registration returns the node's credential");
    (registered["id"].as_str().unwrap().to_owned(), Client::new(base, Some(credential.to_owned())))
}

/// The engine id of the operator holding the engine lease (of the store `store`), once one does.
async fn engine_holder(store: &zeitwork_store::Store) -> String {
    until("an engine lease", async || store.lease("engine").await.unwrap().map(|(h, _)| h)).await
}

/// Returns once `op`'s engine has renewed its lease twice more: it renews before
/// each pass, so at least one whole pass began and ended after the call.
async fn engine_passes(op: &Operator) {
    let mut renewed = op.store.lease("engine").await.unwrap().expect("an engine lease").1;
    for _ in 0..2 {
        let before = renewed;
        renewed = until("the engine lease to be renewed", async || {
            let (holder, expires) = op.store.lease("engine").await.unwrap()?;
            (holder == op.engine_id && expires > before).then_some(expires)
        })
        .await;
    }
}

/// The first instance placed for deployment `dep`, once one is.
async fn first_instance(admin: &Client, dep: &str) -> Value {
    until("a placement", async || {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        is.first().cloned()
    })
    .await
}

/// Deployment `dep` once it says it waits for a ready node.
async fn waiting_for_a_node(admin: &Client, dep: &str) -> Value {
    until("a waiting reason", async || {
        let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
        d["reason"].as_str().is_some_and(|r| r.contains("no ready node")).then_some(d)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_down_node_move_to_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator(dir.path(), 2).await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let register = |host: &str, memory: u32| {
        let (agent, base) = (agent.clone(), base.clone());
        let body = json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"), "capacity": {"vcpu": 4, "memory": memory}});
        async move { own_credential(&base, agent.post::<_, Value>("/api/v1/nodes", &body).await.unwrap()) }
    };
    // The bigger node gets the first instance.
    let (a, node_a) = register("node-a", 8192).await;
    let (b, node_b) = register("node-b", 4096).await;
    let beating = {
        let node_b = node_b.clone();
        let b = b.clone();
        tokio::spawn(async move {
            loop {
                let _ = node_b.post_empty::<Value>(&format!("/api/v1/nodes/{b}/heartbeat")).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };

    let d: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "acme/web:1", "instances_per_region": 1}),
        )
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let instances = |dep: String| {
        let admin = admin.clone();
        async move { admin.get::<Vec<Value>>(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap() }
    };
    let first = first_instance(&admin, &dep).await;
    assert_eq!(first["node"], a.as_str(), "spread, then the node with the most free memory");
    let id = first["id"].as_str().unwrap().to_owned();
    // The agent of node A reports the instance ready: the deployment goes live.
    node_a
        .put::<_, Value>(
            &format!("/api/v1/instances/{id}/status"),
            &json!({"status": "ready", "address": "10.88.0.2:8080"}),
        )
        .await
        .unwrap_or(Value::Null);
    until("activation", || {
        let admin = admin.clone();
        let dep = dep.clone();
        async move {
            Some(admin.get::<Value>(&format!("/api/v1/deployments/{dep}")).await.unwrap())
                .filter(|d| d["status"] == "active")
        }
    })
    .await;

    // Node A stops heartbeating: it goes down and its instance moves to B.
    let replacement = until("re-placement", || {
        let f = instances(dep.clone());
        let b = b.clone();
        async move { f.await.into_iter().find(|i| i["node"] == b.as_str()) }
    })
    .await;
    let node_a: Value = admin.get(&format!("/api/v1/nodes/{a}")).await.unwrap();
    assert_eq!(node_a["status"], "down");
    assert_eq!(node_a["instances"], 0);
    let old: Value = instances(dep.clone()).await.into_iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!(old["status"], "stopped");
    assert!(old["exit_reason"].as_str().unwrap().contains("node is down"));
    let rid = replacement["id"].as_str().unwrap();
    node_b
        .put::<_, Value>(
            &format!("/api/v1/instances/{rid}/status"),
            &json!({"status": "ready", "address": "10.88.0.6:8080"}),
        )
        .await
        .unwrap_or(Value::Null);
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "edge", "scope": {"kind": "cluster", "role": "edge-proxy"}}))
        .await
        .unwrap();
    let edge = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let table: Value = until("the routing table to point at node B", || {
        let edge = edge.clone();
        let host = format!("{dep}.zeitwork.localhost");
        async move {
            let t: Value = edge.get("/api/v1/routing").await.unwrap();
            t["routes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["host"] == host.as_str())
                .filter(|r| r["instances"][0]["upstream"] == "http://node-b:8081")
                .cloned()
        }
    })
    .await;
    assert_eq!(table["instances"].as_array().unwrap().len(), 1);
    let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
    assert_eq!(d["status"], "active", "the deployment stayed live");
    beating.abort();
    op.shutdown().await;
}

/// An operator of the PostgreSQL store at `url` on a free port, with `config`'s other settings.
async fn shared_store_operator(url: &str, data_dir: std::path::PathBuf, config: OperatorConfig) -> Operator {
    // Every operator of one store needs the same key.
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_owned();
    Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        database_url: Some(url.to_owned()),
        encryption_key: Some(key),
        ..config
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operators_on_one_postgres_share_the_api_and_one_runs_the_engine() {
    let pg = zeitwork_testkit::Postgres::start().expect("a throwaway PostgreSQL");
    let url = pg.create_database("operators").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| shared_store_operator(&url, dir.path().join(name), OperatorConfig::default());
    let a = start("a").await;
    let b = start("b").await;
    let token = a.admin_token.clone().or(b.admin_token.clone()).expect("the first operator bootstrapped a token");
    let via_a = Client::new(&format!("http://{}", a.addr()), Some(token.clone()));
    let via_b = Client::new(&format!("http://{}", b.addr()), Some(token.clone()));
    // Both serve the API over the same state.
    via_a.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    via_b.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    via_a.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let t: Value = via_b
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&format!("http://{}", b.addr()), Some(t["secret"].as_str().unwrap().to_owned()));
    let mut nodes = Vec::new();
    for host in ["node-a", "node-b"] {
        let body = json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"), "capacity": {"vcpu": 8, "memory": 8192}});
        nodes.push(own_credential(
            &format!("http://{}", b.addr()),
            agent.post::<_, Value>("/api/v1/nodes", &body).await.unwrap(),
        ));
    }
    let beating = {
        let nodes = nodes.clone();
        tokio::spawn(async move {
            loop {
                for (n, own) in &nodes {
                    let _ = own.post_empty::<Value>(&format!("/api/v1/nodes/{n}/heartbeat")).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Exactly one of them holds the engine lease.
    let holder = engine_holder(&a.store).await;
    assert!(holder == a.engine_id || holder == b.engine_id, "{holder}");
    // Both say who leads, and which of them they are; the metrics agree.
    let state_a: Value = via_a.get("/api/v1/cluster").await.unwrap();
    let state_b: Value = via_b.get("/api/v1/cluster").await.unwrap();
    assert_eq!(state_a["engine_leader"], holder.as_str(), "{state_a}");
    assert_eq!(state_b["engine_leader"], holder.as_str(), "{state_b}");
    assert_eq!(state_a["operator"], a.engine_id.as_str());
    let leaders = [&state_a, &state_b].iter().filter(|s| s["leading"] == true).count();
    assert_eq!(leaders, 1, "{state_a} {state_b}");
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", if state_a["leading"] == true { a.addr() } else { b.addr() }))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("zeitwork_operator_engine_leader 1"), "{metrics}");
    let deploy = |client: Client| async move {
        let d: Value = client
            .post(
                "/api/v1/deployments",
                &json!({"org": "acme", "project": "web", "image": "acme/web:1", "instances_per_region": 2}),
            )
            .await
            .unwrap();
        d["id"].as_str().unwrap().to_owned()
    };
    let placed = |client: Client, dep: String| async move {
        until("placement", || {
            let (client, dep) = (client.clone(), dep.clone());
            async move {
                let is: Vec<Value> = client.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
                (is.len() >= 2).then(|| Value::from(is.len()))
            }
        })
        .await
    };
    let d1 = deploy(via_b.clone()).await;
    placed(via_a.clone(), d1.clone()).await;

    // The leader dies without a word; the other takes the engine over within 10 s.
    let (survivor, client) = if holder == a.engine_id {
        a.abort();
        (b, via_b)
    } else {
        b.abort();
        (a, via_a)
    };
    let died = Instant::now();
    let d2 = deploy(client.clone()).await;
    placed(client.clone(), d2.clone()).await;
    assert!(died.elapsed() < Duration::from_secs(10), "took over after {:?}", died.elapsed());
    let (now_holder, _) = survivor.store.lease("engine").await.unwrap().unwrap();
    assert_eq!(now_holder, survivor.engine_id);
    // No instance was ever created twice, also by the survivor's later passes.
    engine_passes(&survivor).await;
    for dep in [&d1, &d2] {
        let is: Vec<Value> = client.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        assert_eq!(is.len(), 2, "{dep}: {is:?}");
    }
    beating.abort();
    survivor.shutdown().await;
}

/// Reads SSE `data:` lines as JSON until `done` says so (or 20 s pass).
async fn read_events(res: reqwest::Response, mut done: impl FnMut(&Value) -> bool) -> Vec<Value> {
    use futures::StreamExt;
    let mut body = res.bytes_stream();
    let (mut buf, mut seen) = (String::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let chunk = tokio::time::timeout_at(deadline, body.next()).await.expect("events in time").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(i) = buf.find('\n') {
            let line: String = buf.drain(..=i).collect();
            if let Some(d) = line.strip_prefix("data:") {
                let v: Value = serde_json::from_str(d.trim()).unwrap();
                let stop = done(&v);
                seen.push(v);
                if stop {
                    return seen;
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_shows_a_deployment_going_live() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator(dir.path(), 15).await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let body = json!({"hostname": "node-a", "region": "eu", "address": "http://node-a:8081", "capacity": {"vcpu": 4, "memory": 8192}});
    let (_, node_a) = own_credential(&base, agent.post::<_, Value>("/api/v1/nodes", &body).await.unwrap());

    // Bad filters and cluster tokens are refused.
    assert_eq!(admin.stream("/api/v1/events/stream?project=web").await.unwrap_err().status(), Some(400));
    assert_eq!(agent.stream("/api/v1/events/stream").await.unwrap_err().status(), Some(403));
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "dev", "scope": {"kind": "org", "org": "acme", "role": "developer"}}))
        .await
        .unwrap();
    let dev = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let res = dev.stream("/api/v1/events/stream?org=acme&project=web").await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // The stream is open: the feed compares every later change with what it saw by now.
    let d: Value = dev
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "acme/web:1", "instances_per_region": 1}),
        )
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    // The agent reports the instance ready once the stream has shown it
    // starting, as a real instance takes a while to start.
    let mut reporter = None;
    let seen = read_events(res, |v| {
        if reporter.is_none() && v["kind"] == "instance" && v["deployment"] == dep.as_str() {
            let (agent, id) = (node_a.clone(), v["id"].as_str().unwrap().to_owned());
            reporter = Some(tokio::spawn(async move {
                let body = json!({"status": "ready", "address": "10.88.0.2:8080"});
                agent.put::<_, Value>(&format!("/api/v1/instances/{id}/status"), &body).await.ok();
            }));
        }
        v["kind"] == "deployment" && v["status"] == "active"
    })
    .await;
    reporter.expect("the stream showed the instance").await.unwrap();
    assert!(seen.iter().all(|v| v["org"] == "acme" && v["project"] == "web"), "{seen:?}");
    assert!(
        seen.iter().any(|v| v["kind"] == "instance" && v["status"] == "ready" && v["deployment"] == dep.as_str()),
        "{seen:?}"
    );
    let active = seen.last().unwrap();
    assert_eq!(active["id"], dep.as_str());
    assert!(active["previous"].is_string(), "{active}");
    op.shutdown().await;
}

/// A deployment with no room yet waits `pending` with the reason, goes live
/// once a node with room registers, and fails only after the placement
/// timeout; an instance reported failed after going live is placed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_wait_for_room_and_lost_instances_are_placed_again() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        placement_timeout_secs: 3,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let project =
        json!({"name": "web", "org": "acme", "instances_per_region": 1, "resources": {"vcpu": 1, "memory": 512}});
    admin.post::<_, Value>("/api/v1/projects", &project).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "acme/web:1"}))
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let show = |id: String| {
        let admin = admin.clone();
        async move { admin.get::<Value>(&format!("/api/v1/deployments/{id}")).await.unwrap() }
    };
    // No node yet: it waits, saying for what.
    let waiting = waiting_for_a_node(&admin, &dep).await;
    assert_eq!(waiting["status"], "pending", "{waiting}");

    // A node too small for it: still waiting, now for room.
    let register = |host: &str, memory: u32| {
        let agent = agent.clone();
        let body = json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"),
            "capacity": {"vcpu": 8, "memory": memory}, "physical": {"vcpu": 2, "memory": memory}});
        async move { agent.post::<_, Value>("/api/v1/nodes", &body).await.unwrap() }
    };
    let small = register("node-small", 256).await;
    let mut credentials = std::collections::HashMap::new();
    credentials.insert(small["id"].as_str().unwrap().to_owned(), own_credential(&base, small.clone()).1);
    assert_eq!(small["physical"]["vcpu"], 2, "{small}");
    assert_eq!(small["capacity"]["vcpu"], 8, "{small}");
    until("a capacity reason", || async {
        let d = show(dep.clone()).await;
        (d["status"] == "pending" && d["reason"].as_str().is_some_and(|r| r.contains("lacks capacity"))).then_some(d)
    })
    .await;

    // Room appears: it is placed and goes live.
    let big_node = register("node-big", 4096).await;
    credentials.insert(big_node["id"].as_str().unwrap().to_owned(), own_credential(&base, big_node.clone()).1);
    let instance = first_instance(&admin, &dep).await;
    let id = instance["id"].as_str().unwrap().to_owned();
    let on_node = credentials[instance["node"].as_str().unwrap()].clone();
    let report = |id: String, status: &'static str| {
        let agent = on_node.clone();
        async move {
            let body = json!({"status": status, "address": "10.88.0.2:8080", "reason": "test"});
            agent.put::<_, Value>(&format!("/api/v1/instances/{id}/status"), &body).await.ok();
        }
    };
    report(id.clone(), "ready").await;
    until("activation", || async { Some(show(dep.clone()).await).filter(|d| d["status"] == "active") }).await;

    // The instance dies: the desired-count reconciler places another one.
    report(id.clone(), "failed").await;
    let again = until("a replacement", || async {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        is.into_iter().find(|i| i["id"] != id.as_str() && i["status"] == "pending")
    })
    .await;
    assert_eq!(show(dep.clone()).await["status"], "active");
    assert_ne!(again["id"], id.as_str());

    // What can never fit fails after placement_timeout_secs, saying why.
    let huge =
        json!({"name": "huge", "org": "acme", "instances_per_region": 1, "resources": {"vcpu": 1, "memory": 65536}});
    admin.post::<_, Value>("/api/v1/projects", &huge).await.unwrap();
    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "huge", "image": "acme/huge:1"}))
        .await
        .unwrap();
    let big = d["id"].as_str().unwrap().to_owned();
    let failed =
        until("the placement timeout", || async { Some(show(big.clone()).await).filter(|d| d["status"] == "failed") })
            .await;
    assert!(failed["reason"].as_str().unwrap().contains("placement_timeout_secs"), "{failed}");
    op.shutdown().await;
}

/// The operator delivering notifications dies in the middle of a batch (its
/// tasks aborted, as a kill would end them): the other operator on the same
/// PostgreSQL takes the lease and delivers the rest. Nothing is lost, and a
/// row is delivered again only if its first delivery was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_during_delivery_loses_no_notification() {
    use std::sync::{Arc, Mutex};
    let pg = zeitwork_testkit::Postgres::start().expect("a throwaway PostgreSQL");
    let url = pg.create_database("outbox").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let start = |name: &str| {
        let config =
            OperatorConfig { notifications_allow_internal: true, notify_backoff_ms: 100, ..Default::default() };
        shared_store_operator(&url, dir.path().join(name), config)
    };
    // A slow receiver: each delivery takes 150 ms to acknowledge; (delivery id, acknowledged).
    let got: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |headers: axum::http::HeaderMap| {
        let sink = sink.clone();
        async move {
            let id = headers.get("x-zeitwork-delivery").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            let at = sink.lock().unwrap().len();
            sink.lock().unwrap().push((id, false));
            tokio::time::sleep(Duration::from_millis(150)).await;
            sink.lock().unwrap()[at].1 = true;
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let a = start("a").await;
    let b = start("b").await;
    let token = a.admin_token.clone().or(b.admin_token.clone()).unwrap();
    let via_a = Client::new(&format!("http://{}", a.addr()), Some(token.clone()));
    let via_b = Client::new(&format!("http://{}", b.addr()), Some(token));
    via_a.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    via_a.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    via_a
        .post::<_, Value>(
            "/api/v1/projects/acme/web/notifications",
            &json!({"kind": "webhook", "url": format!("http://{receiver}/hook"), "secret": "a secret of sixteen+",
                    "events": ["notification.test"]}),
        )
        .await
        .unwrap();
    let holder = engine_holder(&a.store).await;
    const SENT: usize = 12;
    for _ in 0..SENT {
        via_b.send_raw(reqwest::Method::POST, "/api/v1/projects/acme/web/notifications/test", None).await.unwrap();
    }
    // Kill the delivering operator once a few deliveries are through.
    until("the first deliveries", async || (got.lock().unwrap().len() >= 3).then_some(())).await;
    let (dead, alive, alive_client) = if holder == a.engine_id { (a, b, via_b) } else { (b, a, via_a) };
    dead.abort();
    let cut = got.lock().unwrap().len();
    assert!(cut < SENT, "the crash came too late to test anything: {cut} deliveries already");
    // The survivor takes over and delivers the rest.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ids = loop {
        let seen = got.lock().unwrap().clone();
        let distinct: std::collections::BTreeSet<String> = seen.iter().map(|(id, _)| id.clone()).collect();
        if distinct.len() == SENT {
            break seen;
        }
        assert!(Instant::now() < deadline, "only {} of {SENT} notifications arrived: {seen:?}", distinct.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A delivery id seen twice was not acknowledged the first time (the crash cut it short).
    for (i, (id, acked)) in ids.iter().enumerate() {
        let again = ids[i + 1..].iter().any(|(later, _)| later == id);
        assert!(!(again && *acked), "delivery {id} was acknowledged and still sent again: {ids:?}");
    }
    // The last acknowledgement is recorded; nothing stays pending.
    until("an empty outbox", async || {
        let stats: Value = alive_client.get("/api/admin/outbox/stats").await.unwrap();
        (stats["pending"] == 0 && stats["dead"] == 0).then_some(())
    })
    .await;
    println!("{SENT} notifications, operator killed after {cut} deliveries, {} deliveries in all", ids.len());
    alive.shutdown().await;
}

/// With `require_node_approval`, a node the shared token registers waits in
/// `pending_approval` and gets no placements (a deployment waits for a ready
/// node) until an admin approves it; a rejected node loses its credential and
/// cannot register again until it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_wait_for_an_admins_approval_when_required() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().to_owned(),
        require_node_approval: true,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let project =
        json!({"name": "web", "org": "acme", "instances_per_region": 1, "resources": {"vcpu": 1, "memory": 256}});
    admin.post::<_, Value>("/api/v1/projects", &project).await.unwrap();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let body = |host: &str| {
        json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"),
            "capacity": {"vcpu": 8, "memory": 4096}, "physical": {"vcpu": 2, "memory": 4096}})
    };
    let n: Value = agent.post("/api/v1/nodes", &body("worker-a")).await.unwrap();
    assert_eq!(n["status"], "pending_approval", "{n}");
    let (id, own) = own_credential(&base, n);
    // It heartbeats and polls like any node, and stays pending.
    let beat: Value = own.post_empty(&format!("/api/v1/nodes/{id}/heartbeat")).await.unwrap();
    assert_eq!(beat["status"], "pending_approval");
    let listed: Vec<Value> = admin.get("/api/v1/nodes").await.unwrap();
    assert_eq!(listed[0]["status"], "pending_approval", "{listed:?}");

    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "acme/web:1"}))
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let waiting = waiting_for_a_node(&admin, &dep).await;
    assert_eq!(waiting["status"], "pending", "{waiting}");
    let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
    assert!(is.is_empty(), "a pending node gets no placement: {is:?}");

    // Only an admin approves; the node's own credential may not.
    let denied = own.post_empty::<Value>(&format!("/api/admin/nodes/{id}/approve")).await.unwrap_err();
    assert_eq!(denied.status(), Some(403), "{denied}");
    let approved: Value = admin.post_empty(&format!("/api/admin/nodes/{id}/approve")).await.unwrap();
    assert_eq!(approved["status"], "ready", "{approved}");
    let placed = first_instance(&admin, &dep).await;
    assert_eq!(placed["node"], id.as_str());
    // A second verdict on a ready node is a conflict.
    let again = admin.post_empty::<Value>(&format!("/api/admin/nodes/{id}/reject")).await.unwrap_err();
    assert_eq!(again.status(), Some(409), "{again}");

    // Another node is rejected: its credential stops working, it cannot come back...
    let m: Value = agent.post("/api/v1/nodes", &body("worker-b")).await.unwrap();
    let (other, other_own) = own_credential(&base, m);
    let rejected: Value = admin.post_empty(&format!("/api/admin/nodes/{other}/reject")).await.unwrap();
    assert_eq!(rejected["status"], "rejected");
    let gone = other_own.post_empty::<Value>(&format!("/api/v1/nodes/{other}/heartbeat")).await.unwrap_err();
    assert_eq!(gone.status(), Some(401), "{gone}");
    let back = agent.post::<_, Value>("/api/v1/nodes", &body("worker-b")).await.unwrap_err();
    assert_eq!(back.status(), Some(403), "{back}");
    assert!(back.to_string().contains("rejected"), "{back}");
    // ...until it is deleted; then it registers afresh, pending again.
    admin.delete(&format!("/api/v1/nodes/{other}")).await.unwrap();
    let fresh: Value = agent.post("/api/v1/nodes", &body("worker-b")).await.unwrap();
    assert_eq!(fresh["status"], "pending_approval", "{fresh}");
    op.shutdown().await;
}
