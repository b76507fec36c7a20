//! The operator's half of private networks across nodes, with simulated node
//! agents (API calls as an agent makes them): nodes register their tunnel
//! ends, and each node's assignments name exactly the other nodes that hold
//! members of the same network, with those members' addresses.

mod common;
use common::until;

use serde_json::{json, Value};
use zeitwork_client::Client;

const KEY_A: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";
const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_name_the_nodes_that_share_a_network() {
    let dir = tempfile::tempdir().unwrap();
    let (_op, base, admin) = common::operator(dir.path(), 60).await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    for p in ["web", "spy"] {
        admin.post::<_, Value>("/api/v1/projects", &json!({"name": p, "org": "acme"})).await.unwrap();
    }
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(&base, Some(t["secret"].as_str().unwrap().to_owned()));
    let body = |host: &str, memory: u32, tunnel: Option<(&str, &str)>| {
        let mut b = json!({"hostname": host, "region": "eu", "address": format!("http://{host}:8081"),
            "capacity": {"vcpu": 4, "memory": memory}});
        if let Some((key, endpoint)) = tunnel {
            b["tunnel"] = json!({"public_key": key, "endpoint": endpoint});
        }
        b
    };

    // Malformed tunnel ends are refused, naming the field.
    for (bad, field) in [
        (body("node-x", 4096, Some(("not-a-key", "10.0.0.9:51820"))), "tunnel.public_key"),
        (body("node-x", 4096, Some((KEY_A, "10.0.0.9"))), "tunnel.endpoint"),
    ] {
        let e = agent.post::<_, Value>("/api/v1/nodes", &bad).await.unwrap_err().to_string();
        assert!(e.contains("400") && e.contains(field), "{e}");
    }

    let mut nodes = Vec::new();
    for (host, memory, tunnel) in [
        ("node-a", 8192, Some((KEY_A, "10.0.0.1:51820"))),
        ("node-b", 8192, Some((KEY_B, "10.0.0.2:51820"))),
        ("node-c", 2048, None),
    ] {
        let n: Value = agent.post("/api/v1/nodes", &body(host, memory, tunnel)).await.unwrap();
        let own = Client::new(&base, Some(n["credential"].as_str().unwrap().to_owned()));
        nodes.push((n["id"].as_str().unwrap().to_owned(), own));
    }
    let deploy = |project: &str, n: u32| {
        let (admin, project) = (admin.clone(), project.to_owned());
        async move {
            let body = json!({"org": "acme", "project": project, "image": "acme/web:1", "instances_per_region": n});
            let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
            let dep = d["id"].as_str().unwrap().to_owned();
            until("placement", || {
                let (admin, dep) = (admin.clone(), dep.clone());
                async move {
                    let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
                    (is.len() == n as usize).then_some(is)
                }
            })
            .await
        }
    };
    let web = deploy("web", 2).await;
    deploy("spy", 1).await;
    let web_nodes: Vec<&str> = web.iter().map(|i| i["node"].as_str().unwrap()).collect();
    assert_eq!(
        (web_nodes.contains(&nodes[0].0.as_str()), web_nodes.contains(&nodes[1].0.as_str())),
        (true, true),
        "web is spread over the two big nodes: {web:?}"
    );

    let assignments = |i: usize| {
        let (id, own) = nodes[i].clone();
        async move { own.get::<Vec<Value>>(&format!("/api/v1/nodes/{id}/assignments")).await.unwrap() }
    };
    let version = |h: &reqwest::header::HeaderMap| h["x-assignments-version"].to_str().unwrap().to_owned();
    // Instances get their private addresses when placed: each node's first
    // read already names the other's member.
    let on_a = assignments(0).await;
    let on_b = assignments(1).await;
    let web_of = |list: &[Value]| list.iter().find(|a| a["project"] == "web").cloned().unwrap();
    let (wa, wb) = (web_of(&on_a), web_of(&on_b));
    let peers_a = wa["network"]["tunnel_peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers_a.len(), 1, "node a needs node b only: {wa}");
    assert_eq!(peers_a[0]["node"], nodes[1].0.as_str());
    assert_eq!(peers_a[0]["public_key"], KEY_B);
    assert_eq!(peers_a[0]["endpoint"], "10.0.0.2:51820");
    let b_address = format!("{}/32", wb["network"]["address"].as_str().unwrap());
    assert_eq!(peers_a[0]["allowed_ips"], json!([b_address]), "only b's member of this network");
    let peers_b = &wb["network"]["tunnel_peers"];
    assert_eq!(peers_b[0]["public_key"], KEY_A);
    assert_eq!(peers_b[0]["allowed_ips"], json!([format!("{}/32", wa["network"]["address"].as_str().unwrap())]));
    // A network with no member elsewhere needs no peer.
    let spy = [&on_a, &on_b, &assignments(2).await].into_iter().flatten().find(|a| a["project"] == "spy").cloned();
    let spy = spy.expect("the spy is placed");
    assert!(spy["network"].get("tunnel_peers").is_none(), "{spy}");

    // A node that registers again without a tunnel drops out of the others' peers.
    let again: Value = agent.post("/api/v1/nodes", &body("node-b", 8192, None)).await.unwrap();
    let wa = web_of(&assignments(0).await);
    assert!(wa["network"].get("tunnel_peers").is_none(), "{wa}");

    // A change wakes the watches of the nodes it concerns only: web's env
    // reaches a and b, while c (no web instance) is not read again and
    // answers 304 at its timeout.
    let mut now = nodes.clone();
    now[1].1 = Client::new(&base, Some(again["credential"].as_str().unwrap().to_owned()));
    let mut waiting = Vec::new();
    for (id, own) in now {
        let (_, h) = own.get_with_headers::<Vec<Value>>(&format!("/api/v1/nodes/{id}/assignments")).await.unwrap();
        let path = format!("/api/v1/nodes/{id}/assignments?version={}&timeout=4", version(&h));
        waiting.push(tokio::spawn(async move { own.get_if_changed::<Vec<Value>>(&path).await.unwrap().0 }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let reads = _op.assignments.reads.get();
    admin.put::<_, Value>("/api/v1/projects/acme/web/env/GREETING", &json!({"value": "hello"})).await.unwrap();
    let mut answers = Vec::new();
    for w in waiting {
        answers.push(w.await.unwrap());
    }
    for (i, a) in answers.iter().take(2).enumerate() {
        let a = a.as_ref().unwrap_or_else(|| panic!("node {i} holds web: its watch answers the new set"));
        assert_eq!(web_of(a)["env"]["GREETING"], "hello");
    }
    assert_eq!(answers[2], None, "c's set did not change: 304");
    assert_eq!(_op.assignments.reads.get() - reads, 2, "a and b were read again, c was not");

    // When every turn to read is taken (thousands of agents asking at once),
    // a call waits for one instead of failing, and reads when it comes.
    let hub = _op.assignments.clone();
    let turns = hub.reading.acquire_many(hub.readers as u32).await.unwrap();
    let (id, own) = nodes[0].clone();
    let asked = tokio::spawn(async move { own.get::<Vec<Value>>(&format!("/api/v1/nodes/{id}/assignments")).await });
    until("the call to wait for its turn", || async { (hub.queued.get() == 1).then_some(()) }).await;
    let reads = hub.reads.get();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!asked.is_finished(), "no turn, no answer");
    assert_eq!(hub.reads.get(), reads, "nothing read without a turn");
    drop(turns);
    let list = asked.await.unwrap().expect("the queued call answers once a turn is free");
    assert!(web_of(&list)["env"]["GREETING"] == "hello", "{list:?}");
    assert_eq!((hub.queued.get(), hub.reads.get() - reads), (0, 1));
}
