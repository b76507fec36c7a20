//! The node agent with real parts: an operator on SQLite, a real registry,
//! runc instances, and an edge proxy in front: a request to the deployment's
//! host reaches the app in its container.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

struct Platform {
    op: Operator,
    admin: Client,
    agent: NodeAgent,
    edge_token: String,
    agent_token: String,
    _dir: tempfile::TempDir,
}

async fn platform(range: &str, start_timeout: u64) -> Platform {
    platform_with(range, start_timeout, OperatorConfig::default(), |_| {}).await
}

/// A platform whose operator and agent settings `op_config` and `tune` adjust.
async fn platform_with(
    range: &str,
    start_timeout: u64,
    op_config: OperatorConfig,
    tune: impl FnOnce(&mut NodeAgentConfig),
) -> Platform {
    let dir = tempfile::tempdir().unwrap();
    // As a data directory under /var/lib is: passable by others, so root images
    // run remapped into a user namespace as they do in production.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o711)).unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("op"),
        apps_scheme: "http".into(),
        ..op_config
    })
    .await
    .unwrap();
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"}))
        .await
        .unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
        )
        .await
        .unwrap();
    admin.put::<_, Value>("/api/v1/projects/acme/web/env/GREETING", &json!({"value": "hello-env"})).await.unwrap();
    let token = |role: &str| {
        let admin = admin.clone();
        let role = role.to_owned();
        async move {
            let t: Value = admin
                .post("/api/v1/tokens", &json!({"name": role, "scope": {"kind": "cluster", "role": role}}))
                .await
                .unwrap();
            t["secret"].as_str().unwrap().to_owned()
        }
    };
    let agent_token = token("node-agent").await;
    let edge_token = token("edge-proxy").await;
    let mut config = agent_config(&op, dir.path(), range, &agent_token, start_timeout);
    tune(&mut config);
    let agent = NodeAgent::start(config).await.unwrap();
    Platform { op, admin, agent, edge_token, agent_token, _dir: dir }
}

fn agent_config(op: &Operator, dir: &std::path::Path, range: &str, token: &str, start_timeout: u64) -> NodeAgentConfig {
    NodeAgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: format!("http://{}", op.addr()),
        token: Some(token.to_owned()),
        hostname: format!("agent-{}", range.replace('.', "-")),
        region: "local".into(),
        data_dir: dir.join("agent"),
        run_dir: dir.join("run"),
        instance_range: range.parse().unwrap(),
        runtime: "container".into(),
        start_timeout_secs: start_timeout,
        stop_grace_secs: 2,
        liveness_interval_secs: 1,
        liveness_failures: 2,
        // vCPUs are shared; room for a few deployments side by side.
        vcpu: Some(16),
        ..Default::default()
    }
}

impl Platform {
    /// The deployment's logs once they hold `needle`. Output is captured as it
    /// is written, so a line may land a moment after the app first answers.
    async fn logs_containing(&self, dep: &str, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text =
                self.admin.stream(&format!("/api/v1/deployments/{dep}/logs")).await.unwrap().text().await.unwrap();
            if text.contains(needle) {
                return text;
            }
            assert!(Instant::now() < deadline, "{needle:?} never reached the logs: {text:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deploys `image` with one instance; the operator's engine places it on the agent's node.
    async fn deploy(&self, image: &str) -> (String, String) {
        self.deploy_on(image, &self.agent.node().id).await
    }

    /// Records a deployment of `image` with one instance; its id.
    async fn create_deployment(&self, image: &str) -> String {
        let d: Value = self
            .admin
            .post(
                "/api/v1/deployments",
                &json!({"org": "acme", "project": "web", "image": image, "instances_per_region": 1}),
            )
            .await
            .unwrap();
        d["id"].as_str().unwrap().to_owned()
    }

    /// Deploys `image` with one instance, expected on `node`.
    async fn deploy_on(&self, image: &str, node: &str) -> (String, String) {
        let dep = self.create_deployment(image).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.op.store.list_instances(&dep).await.unwrap().first() {
                assert_eq!(i.node.as_deref(), Some(node));
                return (dep, i.id.clone());
            }
            assert!(Instant::now() < deadline, "the engine never placed {dep}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An edge proxy following this operator, with rate limits out of the way of load loops.
    async fn edge(&self) -> zeitwork_edge::EdgeProxy {
        zeitwork_edge::EdgeProxy::start(zeitwork_edge::EdgeConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            operator_url: format!("http://{}", self.op.addr()),
            token: Some(self.edge_token.clone()),
            rate_limit: zeitwork_api_types::RateLimit { requests_per_second: 100_000, burst: 100_000 },
            ..Default::default()
        })
        .await
        .unwrap()
    }

    async fn deployment(&self, id: &str) -> Value {
        self.admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap()
    }

    async fn wait_status(&self, instance: &str, want: &[&str], within: Duration) -> zeitwork_api_types::Instance {
        let deadline = Instant::now() + within;
        loop {
            let i = self.op.store.get_instance(instance).await.unwrap();
            if want.contains(&i.status.as_str()) {
                return i;
            }
            assert!(Instant::now() < deadline, "instance stayed {:?} (wanted {want:?}): {i:?}", i.status);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Waits until `served` (the answers a load loop counts) grows by `more`:
/// requests that went on after a switch, whatever the machine's speed.
async fn served_more(served: &std::sync::atomic::AtomicUsize, more: usize, what: &str) {
    let from = served.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(30);
    while served.load(std::sync::atomic::Ordering::Relaxed) < from + more {
        assert!(Instant::now() < deadline, "fewer than {more} requests {what} within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_through_the_edge_reaches_the_app_in_its_container() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg
        .push_busybox(
            "acme/web",
            "v1",
            "echo started with $GREETING; (i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done) & exec /bin/busybox httpd -f -p $PORT -h /www",
        )
        .await
        .unwrap();
    let p = platform("10.215.0.0", 30).await;
    let (dep, inst) = p.deploy(&image).await;
    let ready = p.wait_status(&inst, &["ready"], Duration::from_secs(60)).await;
    assert!(ready.address.as_deref().is_some_and(|a| a.starts_with("10.215.")), "{ready:?}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.deployment(&dep).await["status"] != "active" {
        assert!(Instant::now() < deadline, "the deployment never became active: {}", p.deployment(&dep).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let edge = p.edge().await;
    let host = format!("{dep}.zeitwork.localhost");
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let res = reqwest::Client::new()
            .get(format!("http://{}/", edge.http_addr()))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        if res.status() == 200 {
            break res.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the edge never routed to the instance: {}", res.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body, "hello from a container\n");
    // The project's host follows the active deployment.
    let res = reqwest::Client::new()
        .get(format!("http://{}/", edge.http_addr()))
        .header("host", "web-acme.zeitwork.localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // The agent forwards for edge proxies only.
    let agent: SocketAddr = p.agent.addr();
    let direct = |token: Option<String>| {
        let inst = inst.clone();
        async move {
            let mut req = reqwest::Client::new().get(format!("http://{agent}/")).header("x-zeitwork-instance", inst);
            if let Some(t) = token {
                req = req.header("x-zeitwork-edge-token", t);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(direct(None).await, 401);
    assert_eq!(direct(Some(p.agent_token.clone())).await, 403);
    assert_eq!(direct(Some(p.edge_token.clone())).await, 200);

    // A request naming an instance reaches the app even on a path the agent itself serves.
    let res = reqwest::Client::new()
        .get(format!("http://{agent}/health"))
        .header("x-zeitwork-instance", &inst)
        .header("x-zeitwork-edge-token", &p.edge_token)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "busybox httpd has no /health; the agent's own answer would be 200");

    // Logs through the operator: the app saw the project's env vars.
    let text = p.logs_containing(&dep, &format!("{inst} started with hello-env")).await;
    let json_lines = p
        .admin
        .stream(&format!("/api/v1/deployments/{dep}/logs?format=json&since=1h"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let first: Value = serde_json::from_str(json_lines.lines().next().expect("a line")).unwrap();
    assert_eq!(first["instance"], inst.as_str());
    assert_eq!(first["stream"], "stdout");
    let bad = p.admin.stream(&format!("/api/v1/deployments/{dep}/logs?since=yesterday")).await.unwrap_err();
    assert_eq!(bad.status(), Some(400), "{bad}");
    // The agent's log endpoint is for operators, not for edge proxies or strangers.
    let agent_logs = |token: String| {
        let inst = inst.clone();
        async move {
            reqwest::Client::new()
                .get(format!("http://{agent}/v1/instances/{inst}/logs"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(agent_logs(p.edge_token.clone()).await, 403);
    assert_eq!(agent_logs("zw_nope_nope".into()).await, 403);
    // Metrics through the operator: the instance's use, from its cgroups.
    let m: Value = p.admin.get(&format!("/api/v1/deployments/{dep}/metrics")).await.unwrap();
    assert_eq!(m["ready"], 1, "{m}");
    let im = &m["instances"][0];
    assert!(im["error"].is_null(), "{m}");
    assert_eq!(im["memory_limit_bytes"], 128 * 1024 * 1024, "{m}");
    assert!(im["memory_bytes"].as_u64().unwrap() > 0, "{m}");
    assert!(m["memory_bytes"].as_u64().unwrap() > 0, "{m}");
    let agent_metrics = reqwest::Client::new()
        .get(format!("http://{agent}/v1/instances/{inst}/metrics"))
        .bearer_auth(&p.edge_token)
        .send()
        .await
        .unwrap();
    assert_eq!(agent_metrics.status(), 403);

    // Following: history first, then lines the app writes later arrive on the open stream.
    let last_tick = text.lines().filter_map(|l| l.rsplit_once("tick ")?.1.parse::<u32>().ok()).max().unwrap_or(0);
    let later = format!("tick {}\n", last_tick + 2);
    let mut follow = p.admin.stream(&format!("/api/v1/deployments/{dep}/logs?follow=true")).await.unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !(seen.contains("started with hello-env") && seen.contains(&later)) {
        let chunk = tokio::time::timeout_at(deadline.into(), follow.chunk()).await.expect("followed lines").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("the stream stays open")));
    }
    drop(follow);

    edge.shutdown().await;
    let node_id = p.agent.node().id.clone();
    p.agent.shutdown().await;
    let stopped = p.op.store.get_instance(&inst).await.unwrap();
    assert_eq!(stopped.status.as_str(), "stopping", "stopping the agent stops its instances, out of traffic");
    assert!(stopped.exit_reason.as_deref().unwrap_or("").contains("comes back"), "{stopped:?}");
    // The agent starts again: the same node, and its instance is back.
    let again = NodeAgent::start(agent_config(&p.op, p._dir.path(), "10.215.0.0", &p.agent_token, 30)).await.unwrap();
    assert_eq!(again.node().id, node_id);
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.op.store.get_instance(&inst).await.unwrap().status.as_str() != "ready" {
        assert!(Instant::now() < deadline, "the instance did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d: Value = p.admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
    assert_eq!(d["status"], "active");
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_that_stops_answering_is_reported_unhealthy_then_ready_again() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let p = platform("10.219.0.0", 30).await;
    // Serves, stops serving while its process stays up, then serves again.
    let flaky = reg
        .push_busybox(
            "acme/flaky",
            "v1",
            "/bin/busybox httpd -f -p $PORT -h /www & pid=$!; sleep 4; kill $pid; sleep 5; \
             exec /bin/busybox httpd -f -p $PORT -h /www",
        )
        .await
        .unwrap();
    let (_, inst) = p.deploy(&flaky).await;
    p.wait_status(&inst, &["ready"], Duration::from_secs(30)).await;
    let sick = p.wait_status(&inst, &["unhealthy"], Duration::from_secs(15)).await;
    assert!(sick.exit_reason.as_deref().unwrap_or("").contains("health checks in a row failed"), "{sick:?}");
    // Out of the routing table while unhealthy: the table follows the store a moment later.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let table: Value = p.admin.get("/api/v1/routing").await.unwrap();
        if !table.to_string().contains(&inst) {
            break;
        }
        assert!(Instant::now() < deadline, "an unhealthy instance stayed in the routing table: {table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.wait_status(&inst, &["ready"], Duration::from_secs(15)).await;
    p.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apps_that_fail_say_why() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let p = platform("10.216.0.0", 3).await;
    // Never opens its port.
    let silent = reg.push_busybox("acme/silent", "v1", "exec /bin/busybox sleep 600").await.unwrap();
    let (_, a) = p.deploy(&silent).await;
    // Exits at once.
    let crash = reg.push_busybox("acme/crash", "v1", "echo bye; exit 7").await.unwrap();
    let (_, b) = p.deploy(&crash).await;
    // Cannot be pulled.
    let (_, c) = p.deploy(&format!("{}/acme/missing:v1", reg.addr)).await;

    let a = p.wait_status(&a, &["failed"], Duration::from_secs(30)).await;
    assert!(a.exit_reason.as_deref().unwrap_or("").contains("did not answer on port 8080"), "{a:?}");
    let b = p.wait_status(&b, &["exited", "failed"], Duration::from_secs(30)).await;
    assert_eq!(b.exit_code, Some(7), "{b:?}");
    let c = p.wait_status(&c, &["failed"], Duration::from_secs(30)).await;
    assert!(c.exit_reason.as_deref().unwrap_or("").contains("not found"), "{c:?}");
    // Each deployment failed with its instance's reason; none became active.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let deps: Vec<Value> = p.admin.get("/api/v1/deployments").await.unwrap();
        if deps.iter().all(|d| d["status"] == "failed") {
            assert!(
                deps.iter().any(|d| d["reason"].as_str().unwrap_or("").contains("did not answer on port 8080")),
                "{deps:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{deps:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_deployments_switch_without_failed_requests_then_roll_back_and_promote() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let v1 = reg.push_busybox("acme/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await.unwrap();
    let v2 = reg
        .push_busybox("acme/web", "v2", "echo v2 > /tmp/index.html; exec /bin/busybox httpd -f -p $PORT -h /tmp")
        .await
        .unwrap();
    let v3 = reg
        .push_busybox("acme/web", "v3", "echo v3 > /tmp/index.html; exec /bin/busybox httpd -f -p $PORT -h /tmp")
        .await
        .unwrap();
    let p = platform("10.217.0.0", 30).await;
    let edge = p.edge().await;
    let edge_addr = edge.http_addr();
    let fetch = move |host: &'static str| async move {
        let res = reqwest::Client::new().get(format!("http://{edge_addr}/")).header("host", host).send().await.unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    };
    let wait_body = |want: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, body) = fetch("web-acme.zeitwork.localhost").await;
            if status == 200 && body == want {
                return;
            }
            assert!(Instant::now() < deadline, "production never served {want:?}: {status} {body:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (d1, _) = p.deploy(&v1).await;
    wait_body("hello from a container\n").await;

    // Keep requesting while v2 rolls out: not one may fail.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = fetch("web-acme.zeitwork.localhost").await;
                if status == 200 {
                    ok += 1;
                } else {
                    bad.push((status, body));
                }
            }
            (ok, bad)
        })
    };
    let (d2, _) = p.deploy(&v2).await;
    wait_body("v2\n").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = hammer.await.unwrap();
    assert!(bad.is_empty() && ok > 10, "{ok} ok, failed: {bad:?}");
    assert_eq!(p.deployment(&d1).await["status"], "standby");
    assert_eq!(p.deployment(&d2).await["status"], "active");
    let current: Value = p.admin.get("/api/v1/projects/acme/web/deployments/current").await.unwrap();
    assert_eq!(current["id"], d2.as_str());

    // Rollback is a routing switch to the standby deployment.
    let back: Value = p.admin.post("/api/v1/projects/acme/web/rollback", &json!({})).await.unwrap();
    assert_eq!(back["id"], d1.as_str());
    wait_body("hello from a container\n").await;
    assert_eq!(p.deployment(&d2).await["status"], "standby");

    // Promote staging's active deployment to production.
    let d: Value = p
        .admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": v3, "instances_per_region": 1, "environment": "staging"}),
        )
        .await
        .unwrap();
    let d3 = d["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.deployment(&d3).await["status"] != "active" {
        assert!(Instant::now() < deadline, "staging never became active: {}", p.deployment(&d3).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted: Value = p
        .admin
        .post("/api/v1/projects/acme/web/promote", &json!({"from": "staging", "to": "production"}))
        .await
        .unwrap();
    assert_eq!(promoted["id"], d3.as_str());
    wait_body("v3\n").await;
    let err = p
        .admin
        .post::<_, Value>("/api/v1/projects/acme/web/promote", &json!({"from": "preview", "to": "production"}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409));
    let instances: Vec<Value> = p.admin.get(&format!("/api/v1/deployments/{d3}/instances")).await.unwrap();
    assert_eq!(instances.len(), 1);

    // New resources roll over to a new deployment of the same image, with no failed request.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hammer = {
        let (stop, served) = (stop.clone(), served.clone());
        tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = fetch("web-acme.zeitwork.localhost").await;
                if status == 200 && body == "v3\n" {
                    ok += 1;
                    served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    bad.push((status, body));
                }
            }
            (ok, bad)
        })
    };
    p.admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"resources": {"vcpu": 1, "memory": 192}}))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let rolled = loop {
        let current: Value = p.admin.get("/api/v1/projects/acme/web/deployments/current").await.unwrap();
        if current["id"] != d3.as_str() {
            break current["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the new resources never rolled over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Requests go on a while after the switch, to the new deployment.
    served_more(&served, 20, "answered after the rollover").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = hammer.await.unwrap();
    assert!(bad.is_empty() && ok > 10, "{ok} ok, failed: {bad:?}");
    let assigned = p.op.store.node_assignments(&p.agent.node().id).await.unwrap();
    let new = assigned.iter().find(|a| a.deployment == rolled).expect("the new deployment runs on the node");
    assert_eq!(new.resources.memory, 192, "it runs with the new resources");
    edge.shutdown().await;
    p.agent.shutdown().await;
}

/// An OCI archive with the host's busybox serving `body` on $PORT.
fn busybox_archive(body: &str) -> Vec<u8> {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static is needed");
    let layers = vec![
        zeitwork_testkit::layer_tar(&[("bin/", b""), ("bin/busybox", &busybox), ("bin/sh", b"->busybox")]),
        zeitwork_testkit::layer_tar(&[("www/", b""), ("www/index.html", body.as_bytes())]),
    ];
    let config = zeitwork_image::archive::BuildConfig {
        entrypoint: vec!["/bin/busybox".into(), "httpd".into(), "-f".into(), "-p".into(), "8080".into()],
        cmd: vec!["-h".into(), "/www".into()],
        exposed_ports: vec![8080],
        ..Default::default()
    };
    let mut out = Vec::new();
    zeitwork_image::archive::write_oci_archive(&mut out, &layers, &config).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_uploaded_archive_deploys_without_a_registry() {
    let p = platform("10.220.0.0", 30).await;
    let archive = busybox_archive("from an archive\n");
    let up: Value =
        p.admin.upload("/api/v1/orgs/acme/images?name=web", "application/x-tar", archive.clone().into()).await.unwrap();
    let image = up["image"].as_str().unwrap().to_owned();
    assert!(image.starts_with("archive.zeitwork/acme/web@sha256:"), "{up}");
    assert_eq!(up["layers"], 2);
    assert_eq!(up["existing"], false);
    // The same bytes again are the same image, stored once.
    let again: Value =
        p.admin.upload("/api/v1/orgs/acme/images?name=web", "application/x-tar", archive.into()).await.unwrap();
    assert_eq!(again["image"], up["image"]);
    assert_eq!(again["existing"], true);

    let (dep, inst) = p.deploy(&image).await;
    let ready = p.wait_status(&inst, &["ready"], Duration::from_secs(60)).await;
    let addr = ready.address.unwrap();
    let body = reqwest::get(format!("http://{addr}/")).await.unwrap().text().await.unwrap();
    assert_eq!(body, "from an archive\n");
    assert!(p.deployment(&dep).await["image"].as_str().unwrap().contains("@sha256:"));

    // Bad uploads say what is wrong; nothing is stored.
    let junk = p
        .admin
        .upload::<Value>("/api/v1/orgs/acme/images?name=web", "application/x-tar", b"not a tar".to_vec().into())
        .await
        .unwrap_err();
    assert_eq!(junk.status(), Some(400), "{junk}");
    let empty = p
        .admin
        .upload::<Value>("/api/v1/orgs/acme/images?name=web", "application/x-tar", Vec::new().into())
        .await
        .unwrap_err();
    assert_eq!(empty.status(), Some(400), "{empty}");
    let bad_name = p
        .admin
        .upload::<Value>("/api/v1/orgs/acme/images?name=Not_OK", "application/x-tar", b"x".to_vec().into())
        .await
        .unwrap_err();
    assert_eq!(bad_name.status(), Some(400), "{bad_name}");
    let no_org = p
        .admin
        .upload::<Value>("/api/v1/orgs/nobody/images?name=web", "application/x-tar", b"x".to_vec().into())
        .await
        .unwrap_err();
    assert_eq!(no_org.status(), Some(404), "{no_org}");
    // An archive reference must exist and belong to the deploying org.
    p.admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();
    p.admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "other", "port": 8080})).await.unwrap();
    let foreign = p
        .admin
        .post::<_, Value>("/api/v1/deployments", &json!({"org": "other", "project": "web", "image": image}))
        .await
        .unwrap_err();
    assert_eq!(foreign.status(), Some(400), "{foreign}");
    let missing = format!("archive.zeitwork/acme/web@sha256:{}", "0".repeat(64));
    let missing = p
        .admin
        .post::<_, Value>("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": missing}))
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("upload the archive first"), "{missing}");

    // The registry API serves node agents and members, no one else.
    let v2 = |token: Option<&str>| {
        let mut req = reqwest::Client::new().get(format!("http://{}/v2/", p.op.addr()));
        if let Some(t) = token {
            req = req.basic_auth("zeitwork", Some(t));
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(v2(None).await, 401);
    assert_eq!(v2(Some(&p.edge_token)).await, 403);
    let digest = image.rsplit_once('@').unwrap().1;
    let manifest = |repo: &str, password: &str| {
        let req = reqwest::Client::new()
            .get(format!("http://{}/v2/{repo}/manifests/{digest}", p.op.addr()))
            .basic_auth("zeitwork", Some(password));
        async move { req.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(manifest("acme/web", &p.edge_token).await, 403);
    // A node agent's own token pulls nothing: it presents the credential of one assignment.
    assert_eq!(manifest("acme/web", &p.agent_token).await, 403);
    // The shared node-agent token only registers; the agent reads with its node's own credential.
    let shared = Client::new(&format!("http://{}", p.op.addr()), Some(p.agent_token.clone()));
    let node = p.agent.node().id.clone();
    let refused = shared.get::<Vec<Value>>(&format!("/api/v1/nodes/{node}/assignments")).await.unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    let agent_client = p.admin.clone();
    let assigned: Vec<Value> = agent_client.get(&format!("/api/v1/nodes/{node}/assignments")).await.unwrap();
    let credential = assigned[0]["pull_credential"].as_str().expect("an archive assignment carries a pull credential");
    assert_eq!(manifest("acme/web", credential).await, 200);
    // It is good for that repository only, and not once tampered with.
    let copy: Value = p
        .admin
        .upload("/api/v1/orgs/other/images?name=web", "application/x-tar", busybox_archive("from an archive\n").into())
        .await
        .unwrap();
    assert_eq!(copy["existing"], false, "another organisation's identical upload is not revealed: {copy}");
    assert_eq!(manifest("other/web", credential).await, 401);
    let (head, sig) = credential.rsplit_once('.').unwrap();
    let forged =
        format!("{head}.{}", if sig.starts_with('0') { sig.replacen('0', "1", 1) } else { format!("0{}", &sig[1..]) });
    assert_eq!(manifest("acme/web", &forged).await, 401);

    // Assignments are a long poll: an unchanged set waits, a stale version answers at once.
    let (list, h) =
        agent_client.get_with_headers::<Vec<Value>>(&format!("/api/v1/nodes/{node}/assignments")).await.unwrap();
    assert_eq!(list.len(), 1);
    let version = h["x-assignments-version"].to_str().unwrap().to_owned();
    let t = Instant::now();
    let (unchanged, h) = agent_client
        .get_if_changed::<Vec<Value>>(&format!("/api/v1/nodes/{node}/assignments?version={version}&timeout=1"))
        .await
        .unwrap();
    assert!(t.elapsed() >= Duration::from_millis(900), "an unchanged set is held until the timeout");
    assert_eq!(unchanged, None, "and then answered 304 Not Modified");
    assert_eq!(h["x-assignments-version"].to_str().unwrap(), version);
    let t = Instant::now();
    agent_client
        .get_with_headers::<Vec<Value>>(&format!("/api/v1/nodes/{node}/assignments?version=stale&timeout=30"))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "a changed set answers at once");
    let bad = agent_client
        .get_with_headers::<Vec<Value>>(&format!("/api/v1/nodes/{node}/assignments?timeout=0"))
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(400));
    p.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_moves_its_instances_without_failed_requests() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let v1 = reg.push_busybox("acme/web", "v1", "exec /bin/busybox httpd -f -p $PORT -h /www").await.unwrap();
    let p = platform("10.221.0.0", 30).await;
    let second = NodeAgent::start(NodeAgentConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: format!("http://{}", p.op.addr()),
        token: Some(p.agent_token.clone()),
        hostname: "agent-b".into(),
        region: "local".into(),
        data_dir: p._dir.path().join("agent-b"),
        run_dir: p._dir.path().join("run-b"),
        instance_range: "10.222.0.0".parse().unwrap(),
        stop_grace_secs: 2,
        vcpu: Some(16),
        ..Default::default()
    })
    .await
    .unwrap();
    let edge = p.edge().await;
    let edge_addr = edge.http_addr();
    let fetch = move || async move {
        let res = reqwest::Client::new()
            .get(format!("http://{edge_addr}/"))
            .header("host", "web-acme.zeitwork.localhost")
            .send()
            .await
            .unwrap();
        res.status().as_u16()
    };
    let d: Value = p
        .admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": v1, "instances_per_region": 1}))
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetch().await != 200 {
        assert!(Instant::now() < deadline, "the deployment never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An active deployment cannot be stopped.
    let err = p.admin.post_empty::<Value>(&format!("/api/v1/deployments/{dep}/stop")).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");

    let first: Vec<Value> = p.admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
    let node = first[0]["node"].as_str().unwrap().to_owned();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hammer = {
        let (stop, served) = (stop.clone(), served.clone());
        tokio::spawn(async move {
            let (mut ok, mut bad) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match fetch().await {
                    200 => {
                        ok += 1;
                        served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    other => bad.push(other),
                }
            }
            (ok, bad)
        })
    };
    let drained: Value = p.admin.post_empty(&format!("/api/v1/nodes/{node}/drain")).await.unwrap();
    assert_eq!(drained["status"], "draining");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: Value = p.admin.get(&format!("/api/v1/nodes/{node}")).await.unwrap();
        if n["status"] == "drained" && n["instances"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the node never drained: {n}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Requests go on a while after the move, to the new instance.
    served_more(&served, 20, "answered after the drain").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad) = hammer.await.unwrap();
    assert!(bad.is_empty() && ok > 10, "{ok} ok, failed: {bad:?}");

    // The project now runs elsewhere, healthy, and says so.
    let health: Vec<Value> = p.admin.get("/api/v1/projects/acme/web/health").await.unwrap();
    assert_eq!(health[0]["health"], "healthy", "{health:?}");
    assert_eq!(health[0]["ready"], 1);
    assert_ne!(health[0]["instances"][0]["node"], node.as_str());
    let routing: Vec<Value> = p.admin.get("/api/v1/projects/acme/web/routing").await.unwrap();
    let prod = routing.iter().find(|r| r["host"] == "web-acme.zeitwork.localhost").expect("the project's host");
    assert_eq!(prod["deployment"], dep.as_str());
    assert_eq!(prod["instances"], 1);

    // A drained node can be removed (once its agent is gone, or it registers again).
    let (drained_agent, other) = if p.agent.node().id == node { (p.agent, second) } else { (second, p.agent) };
    drained_agent.shutdown().await;
    p.admin.delete(&format!("/api/v1/nodes/{node}")).await.unwrap();

    // A deployment that no longer serves can be stopped; its instances stop.
    let d2: Value = p
        .admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": v1, "instances_per_region": 1}))
        .await
        .unwrap();
    let d2 = d2["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.admin.get::<Value>(&format!("/api/v1/deployments/{dep}")).await.unwrap()["status"] != "standby" {
        assert!(Instant::now() < deadline, "{d2} never replaced {dep}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped: Value = p.admin.post_empty(&format!("/api/v1/deployments/{dep}/stop")).await.unwrap();
    assert_eq!(stopped["status"], "retired");
    let instances: Vec<Value> = p.admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
    assert!(instances.iter().all(|i| i["status"] == "stopped"), "{instances:?}");
    edge.shutdown().await;
    other.shutdown().await;
}

/// The same path with the QEMU microVM driver (KVM when it works here, TCG
/// otherwise): the app boots in its own VM, answers through the edge and the
/// agent's forwarding, its logs reach the operator, a VMM that dies is
/// restarted, and stopping the deployment delivers SIGTERM to the app and
/// removes the VM's tap and files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_microvm_instance_serves_restarts_and_stops_gracefully() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg
        .push_busybox(
            "acme/web",
            "vm",
            "echo vm started with $GREETING; /bin/busybox httpd -f -p $PORT -h /www & \
             trap 'echo got SIGTERM; kill $!; exit 0' TERM; wait",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = platform("10.226.0.0", 30).await;
    let mut config = agent_config(&p.op, dir.path(), "10.227.0.0", &p.agent_token, 180);
    config.runtime = "qemu".into();
    config.hostname = "vm-node".into();
    let vm_agent = NodeAgent::start(config).await.unwrap();
    assert_eq!(vm_agent.node().runtime, "qemu");
    let detail = vm_agent.node().runtime_detail.clone().unwrap_or_default();
    assert!(detail.contains("kvm") || detail.contains("tcg"), "{detail}");
    // Only the VM node may take the deployment.
    p.admin.post_empty::<Value>(&format!("/api/v1/nodes/{}/drain", p.agent.node().id)).await.unwrap();

    let (dep, inst) = p.deploy_on(&image, &vm_agent.node().id).await;
    let ready = p.wait_status(&inst, &["ready"], Duration::from_secs(240)).await;
    assert!(ready.address.as_deref().is_some_and(|a| a.starts_with("10.227.")), "{ready:?}");
    assert_eq!(ready.runtime.as_deref(), Some("qemu"), "the instance records its node's runtime");
    // Active before anything breaks: a deployment still starting fails when its instance exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.deployment(&dep).await["status"] != "active" {
        assert!(Instant::now() < deadline, "the deployment never became active: {}", p.deployment(&dep).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let edge = p.edge().await;
    let get = || async {
        reqwest::Client::new()
            .get(format!("http://{}/", edge.http_addr()))
            .header("host", format!("{dep}.zeitwork.localhost"))
            .send()
            .await
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = get().await;
        if res.status() == 200 {
            assert_eq!(res.text().await.unwrap(), "hello from a container\n");
            break;
        }
        assert!(Instant::now() < deadline, "the edge never reached the VM: {}", res.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.logs_containing(&dep, "vm started with hello-env").await;

    // The VMM dies: the instance is reported and restarted (with backoff).
    let vm_dir = dir.path().join("agent/vms").join(&inst);
    let pid: i32 = std::fs::read_to_string(vm_dir.join("vmm.pid")).unwrap().trim().parse().unwrap();
    let status = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let restarting = p.wait_status(&inst, &["starting"], Duration::from_secs(30)).await;
    assert!(restarting.exit_reason.as_deref().unwrap_or("").contains("restarting in"), "{restarting:?}");
    p.wait_status(&inst, &["ready"], Duration::from_secs(240)).await;
    let new_pid: i32 = std::fs::read_to_string(vm_dir.join("vmm.pid")).unwrap().trim().parse().unwrap();
    assert_ne!(new_pid, pid, "a new VM runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = get().await.status();
        if status == 200 {
            break;
        }
        if Instant::now() >= deadline {
            let hosts: Vec<String> = edge.state.routes.read().unwrap().hosts.keys().cloned().collect();
            let table: Value = p.admin.get("/api/v1/routing").await.unwrap();
            panic!(
                "the restarted VM never answered through the edge ({status}): {}\nedge hosts {hosts:?}\noperator table {}\ninstances {:?}\nnodes {:?}",
                p.deployment(&dep).await,
                table,
                p.op.store.list_instances(&dep).await.unwrap(),
                p.admin.get::<Value>("/api/v1/nodes").await.unwrap()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A graceful stop of the agent stops its VMs: SIGTERM reaches the app, the VM's resources go.
    let tap = std::fs::read_to_string(vm_dir.join("tap")).unwrap();
    vm_agent.shutdown().await;
    assert!(!vm_dir.exists(), "the VM's directory stayed");
    let link = std::process::Command::new("ip").args(["link", "show", &tap]).output().unwrap();
    assert!(!link.status.success(), "tap {tap} stayed");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "the first VMM is gone");
    let log = std::fs::read_to_string(dir.path().join("agent/logs").join(format!("{inst}.jsonl"))).unwrap();
    assert!(log.contains("got SIGTERM"), "the app did not see SIGTERM: {log}");
}

/// On a one-core node (4 schedulable vCPU), six deployments in a row of a
/// project needing 1 vCPU each all go live: replaced ones sleep and free
/// their share. Every earlier deployment's URL still answers with its own
/// version, waking it on request (two requests at once start one instance);
/// rolling back to a sleeping deployment under load fails no request; a
/// retired deployment's URL answers 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_sleep_and_wake_on_request_on_a_small_node() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let mut images = Vec::new();
    for v in 1..=6 {
        let script = format!("echo v{v} > /tmp/index.html; exec /bin/busybox httpd -f -p $PORT -h /tmp");
        images.push(reg.push_busybox("acme/web", &format!("v{v}"), &script).await.unwrap());
    }
    let op_config = OperatorConfig { rollback_window_secs: 1, ..Default::default() };
    let p = platform_with("10.234.0.0", 30, op_config, |a| a.vcpu = Some(1)).await;
    let node: Value = p.admin.get(&format!("/api/v1/nodes/{}", p.agent.node().id)).await.unwrap();
    assert_eq!((node["physical"]["vcpu"].as_u64(), node["capacity"]["vcpu"].as_u64()), (Some(1), Some(4)), "{node}");
    p.admin.patch::<_, Value>("/api/v1/projects/acme/web", &json!({"sleep_after_secs": 10})).await.unwrap();
    let edge = p.edge().await;
    let edge_addr = edge.http_addr();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let fetch = {
        let http = http.clone();
        move |host: String| {
            let http = http.clone();
            async move {
                match http.get(format!("http://{edge_addr}/")).header("host", host).send().await {
                    Ok(res) => (res.status().as_u16(), res.text().await.unwrap_or_default()),
                    Err(e) => (0, e.to_string()),
                }
            }
        }
    };
    let wait_active = |id: String| {
        let admin = p.admin.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
                if d["status"] == "active" {
                    return;
                }
                assert!(Instant::now() < deadline, "{id} never became active: {d}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Six deployments in a row: all go live, none fails for capacity.
    let mut ids = Vec::new();
    for image in &images {
        let id = p.create_deployment(image).await;
        wait_active(id.clone()).await;
        ids.push(id);
    }
    // The replaced ones sleep: they hold no instance.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: Value = p.admin.get(&format!("/api/v1/deployments/{}", ids[0])).await.unwrap();
        if d["status"] == "sleeping" {
            break;
        }
        assert!(Instant::now() < deadline, "{} never slept: {d}", ids[0]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let node: Value = p.admin.get(&format!("/api/v1/nodes/{}", p.agent.node().id)).await.unwrap();
    assert!(node["allocated"]["vcpu"].as_u64().unwrap() <= 4, "{node}");

    // Every earlier URL answers with its own version, waking it; two requests at once start one instance.
    let host = |id: &str| format!("{id}.zeitwork.localhost");
    let (a, b) = tokio::join!(fetch(host(&ids[0])), fetch(host(&ids[0])));
    assert_eq!(a, (200, "v1\n".to_owned()));
    assert_eq!(b, (200, "v1\n".to_owned()));
    let live: Vec<Value> = p.admin.get(&format!("/api/v1/deployments/{}/instances", ids[0])).await.unwrap();
    let live = live.iter().filter(|i| i["status"] != "stopped").count();
    assert_eq!(live, 1, "one wake starts one instance");
    for (n, id) in ids.iter().enumerate().skip(1) {
        let (status, body) = fetch(host(id)).await;
        assert_eq!((status, body.as_str()), (200, format!("v{}\n", n + 1).as_str()), "{id}");
    }

    // Roll production back to a sleeping deployment while requests keep coming: none fails.
    let asleep = ids[1].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = p.admin.post::<_, Value>(&format!("/api/v1/deployments/{asleep}/sleep"), &json!({})).await;
        if r.is_ok_and(|d| d["status"] == "sleeping") {
            break;
        }
        assert!(Instant::now() < deadline, "{asleep} could not be put to sleep");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Answers by the deployment rolled back to.
    let rolled_back = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let hammer = {
        let (stop, fetch, rolled_back) = (stop.clone(), fetch.clone(), rolled_back.clone());
        tokio::spawn(async move {
            let (mut ok, mut bad, mut last) = (0, Vec::new(), String::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = fetch("web-acme.zeitwork.localhost".into()).await;
                if status == 200 {
                    ok += 1;
                    if body == "v2\n" {
                        rolled_back.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    last = body;
                } else {
                    bad.push((status, body));
                }
            }
            (ok, bad, last)
        })
    };
    let back: Value = p.admin.post("/api/v1/projects/acme/web/rollback", &json!({"to": asleep})).await.unwrap();
    assert_eq!(back["status"], "waking", "{back}");
    wait_active(asleep.clone()).await;
    // Production's requests reach the woken deployment.
    served_more(&rolled_back, 10, "answered by the woken deployment").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, bad, last) = hammer.await.unwrap();
    assert!(bad.is_empty() && ok > 10, "{ok} ok, failed: {bad:?}");
    assert_eq!(last, "v2\n");

    // Retired for good: 410, and its name is refused by the wake endpoint.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: Value = p.admin.get(&format!("/api/v1/deployments/{}", ids[2])).await.unwrap();
        if d["status"] == "sleeping" || d["status"] == "standby" {
            break;
        }
        assert!(Instant::now() < deadline, "{d}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.admin.delete(&format!("/api/v1/deployments/{}", ids[2])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = fetch(host(&ids[2])).await;
        if status == 410 {
            break;
        }
        assert!(Instant::now() < deadline, "a retired deployment answered {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let serving = p.admin.delete(&format!("/api/v1/deployments/{asleep}")).await.unwrap_err();
    assert_eq!(serving.status(), Some(409), "{serving}");
    let bad =
        p.admin.patch::<_, Value>("/api/v1/projects/acme/web", &json!({"sleep_after_secs": 1})).await.unwrap_err();
    assert!(bad.to_string().contains("sleep_after_secs"), "{bad}");

    // An edge that stops while it holds a request for a waking deployment still
    // answers it once the deployment is up: held requests are drained like any other.
    let held = ids[3].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = p.admin.post::<_, Value>(&format!("/api/v1/deployments/{held}/sleep"), &json!({})).await;
        if r.is_ok_and(|d| d["status"] == "sleeping") {
            break;
        }
        assert!(Instant::now() < deadline, "{held} could not be put to sleep");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once the edge knows it sleeps (no instance, to be woken), a request is held.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let table: Value = p.admin.get("/api/v1/routing").await.unwrap();
        let asleep = table["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["host"] == host(&held).as_str() && r["instances"].as_array().is_some_and(|i| i.is_empty()));
        if asleep && edge.routing_version() == table["version"].as_str().unwrap() {
            break;
        }
        assert!(Instant::now() < deadline, "the edge never learnt that {held} sleeps: {table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let request = tokio::spawn(fetch(host(&held)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: Value = p.admin.get(&format!("/api/v1/deployments/{held}")).await.unwrap();
        if d["status"] != "sleeping" {
            break;
        }
        assert!(Instant::now() < deadline && !request.is_finished(), "the held request never woke {held}: {d}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    edge.shutdown().await;
    assert_eq!(request.await.unwrap(), (200, "v4\n".to_owned()), "a request held across the edge's shutdown");
    p.agent.shutdown().await;
}

/// A hostile tenant's instance tries a service of the host on every host
/// address (the gateway of its own link and the host's other addresses):
/// the instance firewall refuses them all, while the host itself reaches the
/// service and the instance still serves its own traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_cannot_reach_the_hosts_services() {
    let service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = service.local_addr().unwrap().port();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let finished = done.clone();
    let accepting = std::thread::spawn(move || {
        // Count connections that got through, until the test ends.
        service.set_nonblocking(true).unwrap();
        let mut reached = 0;
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            match service.accept() {
                Ok(_) => reached += 1,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
            if finished.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
        }
        reached
    });
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let script = "GW=$(/bin/busybox route -n | /bin/busybox awk '$1==\"0.0.0.0\"{print $2}'); \
        for h in $GW $PROBE_HOSTS; do \
          if /bin/busybox nc -w 2 $h $PROBE_PORT </dev/null >/dev/null 2>&1; then echo \"$h open\"; else echo \"$h closed\"; fi; \
        done > /tmp/index.html; \
        { /bin/busybox cat /proc/self/uid_map; /bin/busybox grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status; } > /tmp/self.html; \
        exec /bin/busybox httpd -f -p $PORT -h /tmp";
    let image = reg.push_busybox("acme/probe", "v1", script).await.unwrap();
    let p = platform("10.235.0.0", 60).await;
    // The host's own addresses (not the instance links other tests create and remove meanwhile).
    let listed = std::process::Command::new("ip").args(["-4", "-o", "addr", "show"]).output().unwrap();
    let hosts: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|iface| !iface.starts_with("zw") && iface != "lo"))
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|cidr| cidr.split('/').next().map(str::to_owned))
        .collect();
    assert!(!hosts.is_empty(), "the host has an address besides loopback");
    for (k, v) in [("PROBE_PORT", port.to_string()), ("PROBE_HOSTS", hosts.join(" "))] {
        p.admin.put::<_, Value>(&format!("/api/v1/projects/acme/web/env/{k}"), &json!({"value": v})).await.unwrap();
    }
    // The host reaches its own service on those addresses: the probe can tell open from closed.
    for h in &hosts {
        assert!(std::net::TcpStream::connect((h.as_str(), port)).is_ok(), "{h}:{port} is open from the host");
    }
    let (_, inst) = p.deploy(&image).await;
    let ready = p.wait_status(&inst, &["ready"], Duration::from_secs(60)).await;
    let report =
        reqwest::get(format!("http://{}/", ready.address.as_deref().unwrap())).await.unwrap().text().await.unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let confined = reqwest::get(format!("http://{}/self.html", ready.address.as_deref().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), hosts.len() + 1, "every host address was tried: {report:?}");
    // The image's root is not the host's root, under a seccomp filter, with no
    // capabilities beyond the default set and a process limit.
    let uid_map: Vec<u64> =
        confined.lines().next().unwrap_or("").split_whitespace().filter_map(|n| n.parse().ok()).collect();
    assert!(uid_map.len() == 3 && uid_map[0] == 0 && uid_map[1] >= 65_536, "root is remapped: {confined}");
    assert!(confined.contains("Seccomp:\t2"), "a seccomp filter: {confined}");
    assert!(confined.contains("NoNewPrivs:\t1"), "no new privileges: {confined}");
    let pids_max = [format!("/sys/fs/cgroup/zeitwork/zw-{inst}"), format!("/sys/fs/cgroup/pids/zeitwork/zw-{inst}")]
        .iter()
        .find_map(|d| std::fs::read_to_string(format!("{d}/pids.max")).ok())
        .expect("the instance's pids cgroup (v2 or v1)");
    assert!(pids_max.trim().parse::<u32>().is_ok(), "pids.max is a number, not {pids_max:?}");
    assert!(lines.iter().all(|l| l.ends_with(" closed")), "an instance reached the host: {report:?}");
    let reached = accepting.join().unwrap();
    assert_eq!(reached, hosts.len(), "only the host's own connections got through");
    p.agent.shutdown().await;
}

/// Autoscaling: a project with `scaling` grows its production deployment under
/// memory load (up to max), scales it to zero when no request comes for
/// `sleep_after_secs`, and its next request wakes it and is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_scales_with_load_and_to_zero() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    // Each instance holds 60 MiB of its 128 (tmpfs counts against its memory): load the
    // autoscaler can see without burning the CPU other tests need.
    let script = "/bin/busybox dd if=/dev/zero of=/dev/shm/fill bs=1048576 count=60 2>/dev/null; \
        echo busy > /tmp/index.html; exec /bin/busybox httpd -f -p $PORT -h /tmp";
    let image = reg.push_busybox("acme/busy", "v1", script).await.unwrap();
    let p = platform("10.236.0.0", 30).await;
    let bad = p
        .admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"scaling": {"min_per_region": 3, "max_per_region": 2}}))
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("scaling.min_per_region"), "{bad}");
    let bad = p
        .admin
        .patch::<_, Value>(
            "/api/v1/projects/acme/web",
            &json!({"scaling": {"min_per_region": 0, "max_per_region": 2, "target_cpu_percent": 150}}),
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("scaling.target_cpu_percent"), "{bad}");
    let scaling = json!({"min_per_region": 0, "max_per_region": 2, "target_memory_percent": 30});
    p.admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"scaling": scaling, "sleep_after_secs": 10}))
        .await
        .unwrap();
    let edge = p.edge().await;
    let edge_addr = edge.http_addr();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let fetch = || {
        let http = http.clone();
        async move {
            match http.get(format!("http://{edge_addr}/")).header("host", "web-acme.zeitwork.localhost").send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        }
    };
    let (dep, _) = p.deploy(&image).await;
    let live = |dep: String| {
        let admin = p.admin.clone();
        async move {
            let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
            let ready = is.iter().filter(|i| i["status"] == "ready").count();
            let live =
                is.iter().filter(|i| !["stopped", "failed", "exited"].contains(&i["status"].as_str().unwrap())).count();
            (ready, live)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.deployment(&dep).await["status"] != "active" {
        assert!(Instant::now() < deadline, "never went live: {}", p.deployment(&dep).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The edges learn of the switch a moment after the store records it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch().await.0 != 200 {
        assert!(Instant::now() < deadline, "the edge never served the live deployment: {:?}", fetch().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Under memory load (and with requests coming), it grows to max_per_region.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = fetch().await;
        assert_eq!(status, 200);
        if live(dep.clone()).await.0 == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "never scaled up: {:?}", live(dep.clone()).await);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let events: Vec<Value> = p.admin.get("/api/v1/events?org=acme").await.unwrap();
    assert!(events.iter().any(|e| e["action"] == "deployment.scale"), "scaling is an audit event");
    // No requests for sleep_after_secs: it scales to zero, still the active deployment.
    let deadline = Instant::now() + Duration::from_secs(60);
    while live(dep.clone()).await.1 > 0 {
        assert!(Instant::now() < deadline, "never scaled to zero: {:?}", live(dep.clone()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(p.deployment(&dep).await["status"], "active");
    // The next request wakes it and is answered.
    let (status, body) = fetch().await;
    assert_eq!((status, body.as_str()), (200, "busy\n"));
    edge.shutdown().await;
    p.agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn production_scales_out_on_requests_in_flight() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    // Every request takes a second: a handful of clients keep several in flight.
    let script = "mkdir -p /tmp/w/cgi-bin; \
        printf '#!/bin/sh\\n/bin/busybox sleep 1\\necho Content-Type: text/plain\\necho\\necho slow\\n' \
          > /tmp/w/cgi-bin/slow; \
        /bin/busybox chmod +x /tmp/w/cgi-bin/slow; exec /bin/busybox httpd -f -p $PORT -h /tmp/w";
    let image = reg.push_busybox("acme/slow", "v1", script).await.unwrap();
    let p = platform("10.253.0.0", 30).await;
    let bad = p
        .admin
        .patch::<_, Value>(
            "/api/v1/projects/acme/web",
            &json!({"scaling": {"min_per_region": 1, "max_per_region": 3, "target_concurrency": 0}}),
        )
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("scaling.target_concurrency"), "{bad}");
    p.admin
        .patch::<_, Value>(
            "/api/v1/projects/acme/web",
            &json!({"scaling": {"min_per_region": 1, "max_per_region": 3, "target_concurrency": 2}}),
        )
        .await
        .unwrap();
    let edge = p.edge().await;
    let edge_addr = edge.http_addr();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let fetch = {
        let http = http.clone();
        move || {
            let http = http.clone();
            async move {
                match http
                    .get(format!("http://{edge_addr}/cgi-bin/slow"))
                    .header("host", "web-acme.zeitwork.localhost")
                    .send()
                    .await
                {
                    Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                    Err(e) => (0, e.to_string()),
                }
            }
        }
    };
    let (dep, _) = p.deploy(&image).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while fetch().await != (200, "slow\n".to_string()) {
        assert!(Instant::now() < deadline, "the edge never served the deployment: {:?}", fetch().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = |dep: String| {
        let admin = p.admin.clone();
        async move {
            let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
            is.iter().filter(|i| i["status"] == "ready").count()
        }
    };
    assert_eq!(ready(dep.clone()).await, 1, "one instance before any load");
    // Six clients in a loop: about six requests in flight on one instance, three
    // times the target.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (stop, fetch) = (stop.clone(), fetch.clone());
            tokio::spawn(async move {
                let mut failed = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (status, body) = fetch().await;
                    if status != 200 {
                        failed.push((status, body));
                    }
                }
                failed
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while ready(dep.clone()).await < 2 {
        assert!(Instant::now() < deadline, "never scaled out on requests in flight: {}", ready(dep.clone()).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let failed = c.await.unwrap();
        assert!(failed.is_empty(), "requests failed while scaling out: {failed:?}");
    }
    let events: Vec<Value> = p.admin.get("/api/v1/events?org=acme").await.unwrap();
    let scale = events.iter().find(|e| e["action"] == "deployment.scale").expect("scaling is an audit event");
    assert!(scale["detail"]["concurrency"].as_f64().is_some_and(|c| c > 2.0), "{scale}");
    edge.shutdown().await;
    p.agent.shutdown().await;
}

/// On a QEMU node, a deployment put to sleep is saved to a snapshot on the
/// node's disk, and the request that wakes it through the edge is answered by
/// the same guest (its boot id and in-memory counter continue); a corrupt
/// snapshot falls back to a boot (a new boot id); a retired deployment's
/// snapshot is removed. Prints the wake times of both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sleeping_vm_wakes_from_its_snapshot_and_a_corrupt_one_boots() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg
        .push_busybox(
            "acme/web",
            "snap",
            "cat /proc/sys/kernel/random/uuid > /www/boot; \
             (i=0; while true; do i=$((i+1)); echo $i > /www/count.new; mv /www/count.new /www/count; sleep 1; done) & \
             exec /bin/busybox httpd -f -p $PORT -h /www",
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = platform("10.201.0.0", 30).await;
    let mut config = agent_config(&p.op, dir.path(), "10.202.0.0", &p.agent_token, 240);
    config.runtime = "qemu".into();
    config.hostname = "vm-snap-node".into();
    let vm_agent = NodeAgent::start(config).await.unwrap();
    let detail = vm_agent.node().runtime_detail.clone().unwrap_or_default();
    assert!(detail.contains("wakes from VM snapshots"), "{detail}");
    p.admin.post_empty::<Value>(&format!("/api/v1/nodes/{}/drain", p.agent.node().id)).await.unwrap();
    let node = vm_agent.node().id.clone();
    let snapshots = dir.path().join("agent/snapshots");

    let wait_deployment = |id: String, want: &'static str| {
        let admin = p.admin.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
                if d["status"] == want {
                    return;
                }
                assert!(Instant::now() < deadline, "{id} never became {want}: {d}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let (dep, _) = p.deploy_on(&image, &node).await;
    wait_deployment(dep.clone(), "active").await;
    let edge = p.edge().await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let get = |path: &'static str| {
        let (http, host, addr) = (http.clone(), format!("{dep}.zeitwork.localhost"), edge.http_addr());
        async move {
            let deadline = Instant::now() + Duration::from_secs(240);
            loop {
                match http.get(format!("http://{addr}{path}")).header("host", &host).send().await {
                    Ok(r) if r.status() == 200 => return r.text().await.unwrap(),
                    other => assert!(Instant::now() < deadline, "{host}{path} never answered: {other:?}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let count = || async { get("/count").await.trim().parse::<u64>().unwrap() };
    let boot_id = get("/boot").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count().await < 2 {
        assert!(Instant::now() < deadline, "the app's counter does not move");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = count().await;

    // A newer deployment takes production; the first one is put to sleep and saved.
    let newer = p.create_deployment(&image).await;
    wait_deployment(newer.clone(), "active").await;
    let sleep = || async {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = p.admin.post::<_, Value>(&format!("/api/v1/deployments/{dep}/sleep"), &json!({})).await;
            if r.is_ok_and(|d| d["status"] == "sleeping") {
                break;
            }
            assert!(Instant::now() < deadline, "{dep} could not be put to sleep");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let meta = snapshots.join(&dep).join("meta.json");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !meta.exists() {
            assert!(Instant::now() < deadline, "no snapshot of {dep} appeared in {}", snapshots.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let live: Vec<Value> = p.admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        assert!(live.iter().all(|i| i["status"] == "stopped"), "asleep, it holds no instance: {live:?}");
    };
    sleep().await;

    // The request wakes it: the same guest answers, its memory intact.
    let waking = Instant::now();
    let woken_boot = get("/boot").await;
    let restore_wake = waking.elapsed();
    assert_eq!(woken_boot, boot_id, "woken from the snapshot, not booted");
    let after = count().await;
    assert!(after >= before, "the counter continues from {before}, not from 1: {after}");
    assert!(!snapshots.join(&dep).exists(), "the snapshot is used up by the wake");

    // A snapshot damaged on disk: the wake boots the VM instead (a new boot id).
    sleep().await;
    let state = snapshots.join(&dep).join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&state, bytes).unwrap();
    let waking = Instant::now();
    let booted = get("/boot").await;
    let boot_wake = waking.elapsed();
    assert_ne!(booted, boot_id, "a corrupt snapshot is not restored");
    eprintln!(
        "wake to first byte through the edge (TCG): from a snapshot {} ms, booting {} ms",
        restore_wake.as_millis(),
        boot_wake.as_millis()
    );

    // Retired while asleep: its snapshot goes.
    sleep().await;
    p.admin.delete(&format!("/api/v1/deployments/{dep}")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while snapshots.join(&dep).exists() {
        assert!(Instant::now() < deadline, "the retired deployment's snapshot stayed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    vm_agent.shutdown().await;
}
