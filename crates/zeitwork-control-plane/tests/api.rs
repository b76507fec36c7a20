//! End-to-end tests of the operator API over real HTTP, on SQLite and on a
//! throwaway PostgreSQL, driven through the typed client.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use zeitwork_client::{Client, ClientError};
use zeitwork_control_plane::{Operator, OperatorConfig};

struct Env {
    op: Operator,
    admin: Client,
    raw: reqwest::Client,
    base: String,
    token: String,
    dir: Option<tempfile::TempDir>,
}

async fn start(database_url: Option<String>) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let config = OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        database_url,
        max_body_bytes: 64 * 1024,
        ..Default::default()
    };
    let op = Operator::start(config).await.unwrap();
    let token = op.admin_token.clone().expect("first start creates the admin token");
    let base = format!("http://{}", op.addr());
    Env { admin: Client::new(&base, Some(token.clone())), raw: reqwest::Client::new(), base, token, op, dir: Some(dir) }
}

impl Env {
    fn client(&self, token: &str) -> Client {
        Client::new(&self.base, Some(token.to_owned()))
    }

    /// A raw call for cases the typed client cannot express (bad bodies, headers).
    async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
        ctype: Option<&str>,
    ) -> (StatusCode, Value) {
        let mut req = self.raw.request(method.parse().unwrap(), format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(c) = ctype {
            req = req.header("content-type", c);
        }
        if let Some(b) = body {
            req = req.body(b.to_owned());
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post(&self, path: &str, token: &str, body: &str) -> (StatusCode, Value) {
        self.raw("POST", path, Some(token), Some(body), Some("application/json")).await
    }

    async fn token(&self, scope: Value, read_only: bool) -> String {
        let t: Value = self
            .admin
            .post("/api/v1/tokens", &json!({"name": "t", "scope": scope, "read_only": read_only}))
            .await
            .unwrap();
        t["secret"].as_str().unwrap().to_owned()
    }
}

fn status(e: ClientError) -> u16 {
    e.status().unwrap_or_else(|| panic!("expected an API error, got {e}"))
}

/// Asserts a 4xx with the error shape and a message naming `needle`.
fn assert_error(got: (StatusCode, Value), want: u16, needle: &str) {
    assert_eq!(got.0.as_u16(), want, "{}", got.1);
    let msg = got.1["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message in {}", got.1));
    assert!(got.1["error"]["code"].is_string());
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
}

async fn scenario(env: Env) {
    let e = &env;
    // Health, version, metrics and the API description need no token.
    assert_eq!(e.raw("GET", "/health", None, None, None).await.1["status"], "healthy");
    assert_eq!(e.raw("GET", "/healthz", None, None, None).await.1["status"], "healthy");
    let ready = e.raw("GET", "/api/health/ready", None, None, None).await;
    assert_eq!((ready.0, ready.1["checks"]["store"]["ok"].clone()), (StatusCode::OK, json!(true)));
    assert_eq!(ready.1["status"], "ready");
    assert_eq!(e.raw("GET", "/api/health/startup", None, None, None).await.1["status"], "started");
    assert_eq!(e.raw("GET", "/api/health/startup", None, None, None).await.0, StatusCode::OK);
    let v = e.raw("GET", "/api/version", None, None, None).await.1;
    assert!(v["version"].is_string() && v["commit"].is_string() && v["build_time"].is_string(), "{v}");
    let doc = e.raw("GET", "/api/v1/openapi.json", None, None, None).await.1;
    assert!(doc["paths"]["/api/v1/projects/{org}/{project}"]["patch"].is_object());

    // Admin token file: the printed token, mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&e.op.admin_token_path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&e.op.admin_token_path).unwrap().trim(), e.token);

    // Auth failures.
    assert_error(e.raw("GET", "/api/v1/projects", None, None, None).await, 401, "Authorization");
    assert_error(
        e.raw(
            "GET",
            "/api/v1/projects",
            Some("zw_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"),
            None,
            None,
        )
        .await,
        401,
        "not valid",
    );
    let forged = format!("{}x", &e.token[..e.token.len() - 1]);
    assert_error(e.raw("GET", "/api/v1/projects", Some(&forged), None, None).await, 401, "not valid");

    // Regions.
    let r: Value =
        e.admin.post("/api/v1/regions", &json!({"code": "us-east", "name": "US East", "country": "US"})).await.unwrap();
    assert_eq!(r["code"], "us-east");
    assert_error(
        e.post("/api/v1/regions", &e.token, r#"{"code":"us-east","name":"x","country":"US"}"#).await,
        409,
        "us-east",
    );
    assert_error(
        e.post("/api/v1/regions", &e.token, r#"{"code":"US_East","name":"x","country":"US"}"#).await,
        400,
        "code",
    );
    assert_error(
        e.post("/api/v1/regions", &e.token, r#"{"code":"eu","name":"x","country":"Atlantis"}"#).await,
        400,
        "country",
    );
    // A country's name is taken, as the operations guide gives it, and stored as its code.
    let named: Value = e
        .admin
        .post("/api/v1/regions", &json!({"code": "eu-west", "name": "EU West", "country": "Germany"}))
        .await
        .unwrap();
    assert_eq!(named["country"], "DE");
    let regions: Vec<Value> = e.admin.get("/api/v1/regions").await.unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(e.admin.get::<Value>("/api/v1/regions/eu-west").await.unwrap()["country"], "DE");
    e.admin.delete("/api/v1/regions/eu-west").await.unwrap();
    assert_eq!(status(e.admin.get::<Value>("/api/v1/regions/eu-west").await.unwrap_err()), 404);

    // Nodes register with a node-agent cluster token, idempotently by hostname.
    let agent_token = e.token(json!({"kind": "cluster", "role": "node-agent"}), false).await;
    let agent = e.client(&agent_token);
    let reg = json!({"hostname": "worker-1", "region": "us-east", "address": "http://10.0.0.5:8081", "capacity": {"vcpu": 8, "memory": 16384}});
    let (s1, n1) = e.post("/api/v1/nodes", &agent_token, &reg.to_string()).await;
    let (s2, n2) = e.post("/api/v1/nodes", &agent_token, &reg.to_string()).await;
    assert_eq!((s1.as_u16(), s2.as_u16()), (201, 200));
    assert_eq!(n1["id"], n2["id"]);
    let node_id = n1["id"].as_str().unwrap().to_owned();
    let nodes: Vec<Value> = e.admin.get("/api/v1/nodes").await.unwrap();
    for field in
        ["id", "hostname", "region", "address", "status", "capacity", "allocated", "instances", "last_heartbeat"]
    {
        assert!(nodes[0].get(field).is_some(), "node lacks {field}: {}", nodes[0]);
    }
    assert_eq!(nodes[0]["instances"], 0);
    let one: Value = e.admin.get(&format!("/api/v1/nodes/{node_id}")).await.unwrap();
    assert!(one["instances"].is_u64());
    // Each registration returns the node's own credential; the shared token only registers,
    // and a node's credential acts for that node only.
    let own = n2["credential"].as_str().expect("a registration returns the node's credential").to_owned();
    assert!(one.get("credential").is_none(), "the credential is shown once: {one}");
    let node = e.client(&own);
    node.post_empty::<Value>(&format!("/api/v1/nodes/{node_id}/heartbeat")).await.unwrap();
    assert_error(e.post(&format!("/api/v1/nodes/{node_id}/heartbeat"), &agent_token, "{}").await, 403, "register");
    let old = n1["credential"].as_str().unwrap();
    assert_eq!(
        e.post(&format!("/api/v1/nodes/{node_id}/heartbeat"), old, "{}").await.0,
        401,
        "re-registering replaced it"
    );
    let other = json!({"hostname": "worker-2", "region": "us-east", "address": "http://10.0.0.6:8081", "capacity": {"vcpu": 8, "memory": 16384}});
    let (_, n3) = e.post("/api/v1/nodes", &agent_token, &other.to_string()).await;
    let other_id = n3["id"].as_str().unwrap();
    assert_error(e.post(&format!("/api/v1/nodes/{other_id}/heartbeat"), &own, "{}").await, 403, "acts for node");
    assert_error(
        e.raw("GET", &format!("/api/v1/nodes/{other_id}/assignments"), Some(&own), None, None).await,
        403,
        "acts for node",
    );
    assert_error(e.post("/api/v1/nodes", &own, &other.to_string()).await, 403, "acts for node");
    e.admin.delete(&format!("/api/v1/nodes/{other_id}")).await.unwrap();
    assert_error(e.post("/api/v1/nodes", &agent_token, &json!({"hostname": "w2", "region": "mars", "address": "http://x:1", "capacity": {"vcpu": 1, "memory": 512}}).to_string()).await, 400, "region");
    assert_error(e.post("/api/v1/nodes", &agent_token, &json!({"hostname": "w2", "region": "us-east", "address": "ftp://x", "capacity": {"vcpu": 1, "memory": 512}}).to_string()).await, 400, "address");
    // Implausible capacity is refused: it would only attract placements.
    assert_error(e.post("/api/v1/nodes", &agent_token, &json!({"hostname": "w2", "region": "us-east", "address": "http://10.0.0.7:8081", "capacity": {"vcpu": 4096, "memory": 2_147_483_647u32}}).to_string()).await, 400, "capacity.memory");
    assert_error(e.post("/api/v1/nodes", &agent_token, &json!({"hostname": "w2", "region": "us-east", "address": "http://10.0.0.7:8081", "capacity": {"vcpu": 4096, "memory": 4096}, "physical": {"vcpu": 2, "memory": 4096}}).to_string()).await, 400, "per core");
    // A node agent cannot drain or delete; only admins can.
    assert_eq!(status(agent.post_empty::<Value>(&format!("/api/v1/nodes/{node_id}/drain")).await.unwrap_err()), 403);
    assert_error(e.raw("DELETE", "/api/v1/regions/us-east", Some(&e.token), None, None).await, 409, "node");
    let drained: Value = e.admin.post_empty(&format!("/api/v1/nodes/{node_id}/drain")).await.unwrap();
    assert_eq!(drained["status"], "drained");
    e.admin.delete(&format!("/api/v1/nodes/{node_id}")).await.unwrap();
    assert_eq!(status(e.admin.get::<Value>(&format!("/api/v1/nodes/{node_id}")).await.unwrap_err()), 404);

    // Orgs and members.
    let org: Value = e.admin.post("/api/v1/orgs", &json!({"slug": "acme", "owner": "ceo@acme.test"})).await.unwrap();
    assert_eq!(org["slug"], "acme");
    assert_error(e.post("/api/v1/orgs", &e.token, r#"{"slug":"acme"}"#).await, 409, "acme");
    assert_error(e.post("/api/v1/orgs", &e.token, r#"{"slug":"-acme"}"#).await, 400, "slug");
    e.admin
        .post::<_, Value>("/api/v1/orgs/acme/members", &json!({"user": "dev@acme.test", "role": "developer"}))
        .await
        .unwrap();
    let members: Vec<Value> = e.admin.get("/api/v1/orgs/acme/members").await.unwrap();
    assert_eq!(members.len(), 2);
    e.admin.delete("/api/v1/orgs/acme/members?user=dev%40acme.test").await.unwrap();
    assert_eq!(e.admin.get::<Vec<Value>>("/api/v1/orgs/acme/members").await.unwrap().len(), 1);
    e.admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();

    // Projects.
    let body = json!({"name": "webapp", "org": "acme", "github_repo": "acme/webapp", "branch": "main", "auto_deploy": true, "resources": {"vcpu": 2, "memory": 512}});
    let (s, p) = e.post("/api/v1/projects", &e.token, &body.to_string()).await;
    assert_eq!(s, StatusCode::CREATED, "{p}");
    assert_eq!(
        (p["port"].clone(), p["instances_per_region"].clone(), p["regions"].clone()),
        (json!(8080), json!(3), json!(["us-east"]))
    );
    assert_error(e.post("/api/v1/projects", &e.token, &body.to_string()).await, 409, "already exists");
    let bad = |name: &str| json!({"name": name, "org": "acme"}).to_string();
    for name in ["Web", "-web", "web-", "we_b", "", &"a".repeat(64)] {
        assert_error(e.post("/api/v1/projects", &e.token, &bad(name)).await, 400, "name");
    }
    assert_error(
        e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"acme","colour":"red"}"#).await,
        400,
        "colour",
    );
    assert_error(e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"acme","port":"80"}"#).await, 400, "port");
    assert_error(
        e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"acme","auto_deploy":"yes"}"#).await,
        400,
        "auto_deploy",
    );
    assert_error(e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"acme""#).await, 400, "JSON");
    for (vcpu, memory, field) in [(0, 256, "vcpu"), (33, 256, "vcpu"), (1, 127, "memory"), (1, 65537, "memory")] {
        let b = json!({"name": "x", "org": "acme", "resources": {"vcpu": vcpu, "memory": memory}}).to_string();
        assert_error(e.post("/api/v1/projects", &e.token, &b).await, 400, &format!("resources.{field}"));
    }
    assert_error(e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"nope"}"#).await, 404, "nope");
    assert_error(
        e.post("/api/v1/projects", &e.token, r#"{"name":"x","org":"acme","regions":["mars"]}"#).await,
        400,
        "regions[0]",
    );
    let huge = json!({"name": "x", "org": "acme", "github_repo": "a".repeat(100_000)}).to_string();
    let refused = e.raw.post(format!("{}/api/v1/projects", e.base)).bearer_auth(&e.token).body(huge.clone());
    let refused = refused.send().await.unwrap();
    // Its body unread, the connection is closed and the client is told so.
    assert_eq!(refused.headers().get("connection").and_then(|v| v.to_str().ok()), Some("close"));
    assert_error(e.post("/api/v1/projects", &e.token, &huge).await, 413, "larger");
    // A declared length over the limit is refused before the body is read.
    let mut declared = tokio::net::TcpStream::connect(e.base.trim_start_matches("http://")).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = format!(
        "POST /api/v1/projects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n{{",
        e.token
    );
    declared.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 12];
    declared.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer[9..12], b"413", "{}", String::from_utf8_lossy(&answer));
    // One JSON value per body; trailing data is refused and nothing is created.
    assert_error(
        e.post("/api/v1/orgs", &e.token, r#"{"slug":"trail-a"}{"slug":"trail-b"} garbage"#).await,
        400,
        "after the JSON value",
    );
    assert_eq!(status(e.admin.get::<Value>("/api/v1/orgs/trail-a").await.unwrap_err()), 404);
    // A project runs in at least one region.
    assert_error(
        e.raw(
            "PATCH",
            "/api/v1/projects/acme/webapp",
            Some(&e.token),
            Some(r#"{"regions":[]}"#),
            Some("application/json"),
        )
        .await,
        400,
        "at least one region",
    );
    assert_error(
        e.raw("POST", "/api/v1/projects", Some(&e.token), Some(&body.to_string()), None).await,
        415,
        "Content-Type",
    );
    assert_error(e.raw("GET", "/api/v1/projects?limit=0", Some(&e.token), None, None).await, 400, "limit");
    assert_error(e.raw("GET", "/api/v1/projects?limit=abc", Some(&e.token), None, None).await, 400, "limit");
    assert_error(e.raw("GET", "/api/v1/projects/acme/nope", Some(&e.token), None, None).await, 404, "nope");
    assert_error(e.raw("GET", "/api/v1/projects/nope/webapp", Some(&e.token), None, None).await, 404, "nope");
    let list: Vec<Value> = e.admin.get("/api/v1/projects").await.unwrap();
    assert_eq!(list.len(), 1, "rejected creates stored nothing");

    let patched: Value = e
        .admin
        .patch("/api/v1/projects/acme/webapp", &json!({"auto_deploy": false, "resources": {"vcpu": 4, "memory": 2048}}))
        .await
        .unwrap();
    assert_eq!(
        (patched["auto_deploy"].clone(), patched["resources"].clone()),
        (json!(false), json!({"vcpu": 4, "memory": 2048}))
    );
    assert_eq!(patched["github_repo"], "acme/webapp", "fields not in the patch stay");
    let (s, _) = e
        .raw(
            "PATCH",
            "/api/v1/projects/acme/webapp",
            Some(&e.token),
            Some(r#"{"port":9000,"resources":{"vcpu":99,"memory":512}}"#),
            Some("application/json"),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        e.admin.get::<Value>("/api/v1/projects/acme/webapp").await.unwrap()["port"],
        8080,
        "a rejected patch changes nothing"
    );

    // Org-scoped tokens: roles decide, other orgs are invisible.
    let guest = e.token(json!({"kind": "org", "org": "acme", "role": "guest"}), false).await;
    let dev = e.token(json!({"kind": "org", "org": "acme", "role": "developer"}), false).await;
    let reader = e.token(json!({"kind": "org", "org": "acme", "role": "admin"}), true).await;
    let outsider = e.token(json!({"kind": "org", "org": "other", "role": "owner"}), false).await;
    assert_error(e.post("/api/v1/projects", &guest, r#"{"name":"g","org":"acme"}"#).await, 403, "developer");
    assert_error(e.post("/api/v1/projects", &outsider, r#"{"name":"g","org":"acme"}"#).await, 403, "acme");
    assert_error(e.post("/api/v1/regions", &dev, r#"{"code":"x","name":"x","country":"US"}"#).await, 403, "admin");
    assert_error(e.raw("GET", "/api/v1/nodes", Some(&dev), None, None).await, 403, "cluster");
    assert_error(e.raw("DELETE", "/api/v1/projects/acme/webapp", Some(&dev), None, None).await, 403, "admin");
    assert_error(e.post("/api/v1/tokens", &dev, r#"{"name":"x","scope":{"kind":"admin"}}"#).await, 403, "admin");
    assert_eq!(e.client(&outsider).get::<Vec<Value>>("/api/v1/projects").await.unwrap().len(), 0);
    assert_eq!(e.client(&guest).get::<Vec<Value>>("/api/v1/projects").await.unwrap().len(), 1);
    assert_error(e.post("/api/v1/projects", &reader, r#"{"name":"r","org":"acme"}"#).await, 403, "read-only");

    // Env vars: encrypted at rest, redacted for guests and read-only tokens.
    let v: Value = e
        .client(&dev)
        .put("/api/v1/projects/acme/webapp/env/DATABASE_URL", &json!({"value": "postgres://u:hunter2@db/app"}))
        .await
        .unwrap();
    assert_eq!(v["value"], "postgres://u:hunter2@db/app");
    let replaced: Vec<Value> = e
        .admin
        .put(
            "/api/v1/projects/acme/webapp/env",
            &json!({"DATABASE_URL": "postgres://u:hunter2@db/app", "MODE": "prod"}),
        )
        .await
        .unwrap();
    assert_eq!(replaced.len(), 2);
    for t in [&guest, &reader] {
        let vars: Vec<Value> = e.client(t).get("/api/v1/projects/acme/webapp/env").await.unwrap();
        assert!(vars.iter().all(|v| v["value"].is_null() && v["redacted"] == true), "{vars:?}");
    }
    let vars: Vec<Value> = e.client(&dev).get("/api/v1/projects/acme/webapp/env").await.unwrap();
    assert_eq!(vars[0]["value"], "postgres://u:hunter2@db/app");
    assert_error(
        e.raw(
            "PUT",
            "/api/v1/projects/acme/webapp/env/1BAD",
            Some(&e.token),
            Some(r#"{"value":"x"}"#),
            Some("application/json"),
        )
        .await,
        400,
        "key",
    );
    assert_error(
        e.raw(
            "PUT",
            "/api/v1/projects/acme/webapp/env",
            Some(&e.token),
            Some(r#"{"OK":"1","bad key":"2"}"#),
            Some("application/json"),
        )
        .await,
        400,
        "bad key",
    );
    assert_eq!(
        e.client(&dev).get::<Vec<Value>>("/api/v1/projects/acme/webapp/env").await.unwrap().len(),
        2,
        "rejected replace kept the old set"
    );
    e.admin.delete("/api/v1/projects/acme/webapp/env/MODE").await.unwrap();
    assert_eq!(status(e.admin.delete("/api/v1/projects/acme/webapp/env/MODE").await.unwrap_err()), 404);

    // Domains.
    let d: Value =
        e.admin.post("/api/v1/projects/acme/webapp/domains", &json!({"name": "www.acme.test"})).await.unwrap();
    assert_eq!((d["environment"].clone(), d["verified"].clone()), (json!("production"), json!(false)));
    assert_error(
        e.post("/api/v1/projects/acme/webapp/domains", &e.token, r#"{"name":"www.acme.test"}"#).await,
        409,
        "www.acme.test",
    );
    assert_error(
        e.post("/api/v1/projects/acme/webapp/domains", &e.token, r#"{"name":"not a domain"}"#).await,
        400,
        "name",
    );
    assert_error(
        e.post("/api/v1/projects/acme/webapp/domains", &e.token, r#"{"name":"evil.zeitwork.localhost"}"#).await,
        400,
        "platform",
    );
    assert_eq!(e.admin.get::<Vec<Value>>("/api/v1/projects/acme/webapp/domains").await.unwrap().len(), 1);
    e.admin.delete("/api/v1/projects/acme/webapp/domains/www.acme.test").await.unwrap();

    // Deployment records.
    let dep_body = json!({"project": "webapp", "org": "acme", "image": "ghcr.io/acme/webapp:1.0", "commit_sha": "0123abc", "commit_message": "first", "instances_per_region": 1, "environment": "production"});
    let (s, dep) = e.post("/api/v1/deployments", &dev, &dep_body.to_string()).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{dep}");
    let id = dep["id"].as_str().unwrap();
    let nano = id.strip_prefix("webapp-").and_then(|r| r.strip_suffix("-acme")).unwrap();
    assert!(nano.len() == 7 && nano.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{id}");
    assert_eq!(dep["status"], "pending");
    assert_eq!(dep["url"], format!("https://{id}.zeitwork.localhost"));
    let staging =
        json!({"project": "webapp", "org": "acme", "image": "ghcr.io/acme/webapp:2.0", "environment": "staging"});
    e.post("/api/v1/deployments", &dev, &staging.to_string()).await;
    assert_error(
        e.post(
            "/api/v1/deployments",
            &dev,
            &json!({"project": "webapp", "org": "acme", "image": "NOT AN IMAGE"}).to_string(),
        )
        .await,
        400,
        "image",
    );
    assert_error(
        e.post("/api/v1/deployments", &dev, &json!({"project": "nope", "org": "acme", "image": "a:1"}).to_string())
            .await,
        404,
        "nope",
    );
    assert_error(
        e.post(
            "/api/v1/deployments",
            &dev,
            &json!({"project": "webapp", "org": "acme", "image": "a:1", "environment": "qa"}).to_string(),
        )
        .await,
        400,
        "environment",
    );
    assert_error(e.post("/api/v1/deployments", &guest, &dep_body.to_string()).await, 403, "developer");
    let all: Vec<Value> = e.admin.get("/api/v1/deployments").await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(all.iter().all(|d| d["org"] == "acme" && d["project"] == "webapp" && d["status"] == "pending"));
    assert_eq!(e.admin.get::<Vec<Value>>("/api/v1/deployments?environment=staging").await.unwrap().len(), 1);
    assert_eq!(e.admin.get::<Vec<Value>>("/api/v1/deployments?status=active").await.unwrap().len(), 0);
    assert_eq!(e.admin.get::<Vec<Value>>("/api/v1/deployments?org=other").await.unwrap().len(), 0);
    assert_error(e.raw("GET", "/api/v1/deployments?status=bogus", Some(&e.token), None, None).await, 400, "status");
    assert_eq!(
        e.admin.get::<Value>(&format!("/api/v1/deployments/{id}")).await.unwrap()["image"],
        "ghcr.io/acme/webapp:1.0"
    );
    assert_eq!(status(e.client(&outsider).get::<Value>(&format!("/api/v1/deployments/{id}")).await.unwrap_err()), 404);
    let page = e.admin.list::<Value>("/api/v1/projects/acme/webapp/deployments?limit=1").await.unwrap();
    assert_eq!(page.items.len(), 1);
    let rest = e
        .admin
        .list::<Value>(&format!(
            "/api/v1/projects/acme/webapp/deployments?limit=1&cursor={}",
            zeitwork_client::encode(&page.next_cursor.unwrap())
        ))
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_ne!(rest.items[0]["id"], page.items[0]["id"]);
    // The next page is also a Link (RFC 8288), the request's own query with the cursor.
    let (_, headers) =
        e.admin.get_with_headers::<Value>("/api/v1/projects/acme/webapp/deployments?limit=1").await.unwrap();
    let link = headers.get("link").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let cursor = headers.get("x-next-cursor").and_then(|v| v.to_str().ok()).unwrap().to_owned();
    assert!(
        link.starts_with("</api/v1/projects/acme/webapp/deployments?limit=1&cursor=")
            && link.ends_with(">; rel=\"next\""),
        "{link}"
    );
    let linked = link.trim_start_matches('<').split('>').next().unwrap().to_owned();
    let via_link = e.admin.list::<Value>(&linked).await.unwrap();
    assert_eq!(via_link.items[0]["id"], rest.items[0]["id"], "{link} vs cursor {cursor}");

    // 50 concurrent creates of one project: exactly one 201.
    let creates = (0..50).map(|_| e.post("/api/v1/projects", &e.token, r#"{"name":"race","org":"acme"}"#));
    let results = futures::future::join_all(creates).await;
    let created = results.iter().filter(|r| r.0 == StatusCode::CREATED).count();
    let conflicts = results.iter().filter(|r| r.0 == StatusCode::CONFLICT).count();
    assert_eq!((created, conflicts), (1, 49));

    // The audit log: who did what, including denied calls.
    let events: Vec<Value> = e.admin.get("/api/v1/events?org=acme&action=project.create").await.unwrap();
    assert!(events.iter().any(|ev| ev["result"] == "ok" && ev["target"] == "acme/webapp"), "{events:?}");
    let denied: Vec<Value> = e.admin.get("/api/v1/events?result=denied").await.unwrap();
    assert!(!denied.is_empty());
    assert!(events.iter().all(|ev| ev["actor"].is_string() && ev["at"].is_string()));

    // Tokens: listing never shows secrets; a revoked token stops working.
    let tokens: Vec<Value> = e.admin.get("/api/v1/tokens").await.unwrap();
    assert!(tokens.iter().all(|t| t.get("secret").is_none() && t.get("secret_hash").is_none()));
    let dev_id = format!("tok_{}", dev.split('_').nth(1).unwrap());
    e.admin.delete(&format!("/api/v1/tokens/{dev_id}")).await.unwrap();
    assert_eq!(status(e.client(&dev).get::<Vec<Value>>("/api/v1/projects").await.unwrap_err()), 401);

    // Metrics count requests by route and status; reading them takes an admin
    // token (or the metrics token): without one 401, with a tenant's 403.
    assert_error(e.raw("GET", "/metrics", None, None, None).await, 401, "metrics token");
    let (code, _) = e.raw("GET", "/metrics", Some(&outsider), None, None).await;
    assert_eq!(code, 403);
    let metrics = e.raw("GET", "/metrics", Some(&e.token), None, None).await.1;
    let text = metrics.as_str().unwrap();
    assert!(text.contains(r#"route="/api/v1/projects",status="409""#), "{text}");
    assert!(text.contains("zeitwork_operator_http_request_duration_seconds_bucket"));

    // Stable addresses cannot collide across organisations: corp/web-acme and
    // acme-corp/web would both be web-acme-corp; the second is refused, and
    // so is a project named after another's deployment address.
    for org in ["corp", "acme-corp"] {
        e.admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": org})).await.unwrap();
    }
    e.admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web-acme", "org": "corp"})).await.unwrap();
    assert_error(
        e.post("/api/v1/projects", &e.token, r#"{"name": "web", "org": "acme-corp"}"#).await,
        409,
        "web-acme-corp",
    );
    let d: Value = e
        .admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "corp", "project": "web-acme", "image": "registry.example.com/a:1"}),
        )
        .await
        .unwrap();
    let id = d["id"].as_str().unwrap();
    let (name, org) = id.rsplit_once("-corp").map(|(n, _)| (n, "corp")).unwrap();
    assert_error(
        e.post("/api/v1/projects", &e.token, &json!({"name": name, "org": org}).to_string()).await,
        409,
        "choose another project name",
    );
    // Deleting a project frees its address.
    e.admin.post::<_, Value>("/api/v1/projects", &json!({"name": "site", "org": "corp"})).await.unwrap();
    e.admin.delete("/api/v1/projects/corp/site").await.unwrap();
    e.admin.post::<_, Value>("/api/v1/projects", &json!({"name": "site", "org": "corp"})).await.unwrap();

    // Delete the project; its env vars go with it.
    e.admin.delete("/api/v1/projects/acme/webapp").await.unwrap();
    assert_eq!(status(e.admin.get::<Value>("/api/v1/projects/acme/webapp").await.unwrap_err()), 404);
    env.op.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_on_sqlite() {
    let mut env = start(None).await;
    let db = env.op.admin_token_path.parent().unwrap().join("zeitwork.db");
    let _keep = env.dir.take();
    scenario(env).await;
    // Secrets never reach the database file in clear text.
    let bytes = std::fs::read(&db).unwrap();
    assert!(!contains(&bytes, b"hunter2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_on_postgres() {
    let pg = zeitwork_testkit::Postgres::start().expect("start a throwaway PostgreSQL");
    let url = pg.create_database("api").unwrap();
    scenario(start(Some(url)).await).await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn restart_keeps_data_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let config = || OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        ..Default::default()
    };
    let op = Operator::start(config()).await.unwrap();
    let token = op.admin_token.clone().unwrap();
    let c = Client::new(&format!("http://{}", op.addr()), Some(token.clone()));
    c.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    c.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    c.put::<_, Value>("/api/v1/projects/acme/web/env/SECRET", &json!({"value": "s3cret"})).await.unwrap();
    op.shutdown().await;

    let op = Operator::start(config()).await.unwrap();
    assert!(op.admin_token.is_none(), "the admin token is created once");
    let c = Client::new(&format!("http://{}", op.addr()), Some(token));
    assert_eq!(c.get::<Value>("/api/v1/projects/acme/web").await.unwrap()["name"], "web");
    let vars: Vec<Value> = c.get("/api/v1/projects/acme/web/env").await.unwrap();
    assert_eq!(vars[0]["value"], "s3cret");
    op.shutdown().await;

    // Another key cannot open these secrets: refuse to start rather than fail later.
    let other =
        OperatorConfig { encryption_key: Some("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into()), ..config() };
    let err = Operator::start(other).await.unwrap_err();
    assert!(err.to_string().contains("encryption key"), "{err}");
}

#[tokio::test]
async fn bad_config_names_the_field() {
    let config =
        OperatorConfig { apps_domain: "no".into(), data_dir: Path::new("/nonexistent/x").into(), ..Default::default() };
    let err = Operator::start(config).await.unwrap_err();
    assert!(err.to_string().contains("apps_domain"), "{err}");
}

/// With a metrics token configured, Prometheus scrapes with it; a wrong one is
/// refused, and an admin token still works.
#[tokio::test]
async fn metrics_need_the_metrics_token_or_an_admin() {
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        metrics_token: Some("scrape-me-0123456789".into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let url = format!("http://{}/metrics", op.addr());
    let http = reqwest::Client::new();
    let open = http.get(&url).send().await.unwrap();
    assert_eq!(open.status(), 401);
    assert_eq!(open.headers()["www-authenticate"], "Bearer realm=\"metrics\"");
    assert_eq!(http.get(&url).bearer_auth("scrape-me-012345678").send().await.unwrap().status(), 403);
    assert_eq!(http.get(&url).bearer_auth("scrape-me-0123456789x").send().await.unwrap().status(), 403);
    let ok = http.get(&url).bearer_auth("scrape-me-0123456789").send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.text().await.unwrap().contains("zeitwork_operator_database_up"));
    let admin = op.admin_token.clone().unwrap();
    assert_eq!(http.get(&url).bearer_auth(admin).send().await.unwrap().status(), 200);
    // An empty token is a configuration mistake, named as such.
    let err = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("other"),
        metrics_token: Some(" ".into()),
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("metrics_token"), "{err}");
    op.shutdown().await;
}

/// A custom domain is routed, and may get a certificate, only after its
/// `_zeitwork-challenge` TXT record holds the token the API gave when it was
/// added and it points at the project (CNAME); a real DNS server (dnsmasq)
/// answers, asked at the configured resolver address.
#[tokio::test]
async fn custom_domains_need_their_txt_record_then_their_cname() {
    use zeitwork_testkit::{DnsRecord, Dnsmasq};
    let dir = tempfile::tempdir().unwrap();
    // The resolver's address is fixed in the config; each step below starts
    // dnsmasq afresh on that port with the records of that step.
    let port = zeitwork_testkit::free_udp_port();
    let resolver: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        dns_resolver: Some(resolver),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "acme/web:1"}))
        .await
        .unwrap();
    let dep = d["id"].as_str().unwrap().to_owned();
    op.store.activate_deployment(&dep, &zeitwork_store::Audit::new("test", "deployment.activate", &dep)).await.unwrap();

    let added: Value =
        admin.post("/api/v1/projects/acme/web/domains", &json!({"name": "www.acme.test"})).await.unwrap();
    assert_eq!(added["status"], "unverified", "{added}");
    assert_eq!(added["txt_record"], "_zeitwork-challenge.www.acme.test");
    let token = added["txt_value"].as_str().unwrap().to_owned();
    assert!(token.len() >= 32, "{token}");
    assert!(added["message"].as_str().unwrap().contains(&token), "{added}");
    let routed = || async {
        let t: Value = admin.get("/api/v1/routing").await.unwrap();
        t["routes"].as_array().unwrap().iter().any(|r| r["host"] == "www.acme.test")
    };
    assert!(!routed().await, "an unverified domain is not routed");
    let empty = json!({});
    let verify = || admin.post::<_, Value>("/api/v1/projects/acme/web/domains/www.acme.test/verify", &empty);
    let start = |records: Vec<DnsRecord>| {
        let mut tries = 0;
        loop {
            match Dnsmasq::start_on(port, &records) {
                Ok(d) => return d,
                // The previous one may still hold the port for a moment.
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("{e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    let cname = || DnsRecord::Cname("www.acme.test".into(), "web-acme.zeitwork.localhost".into());
    let target = || DnsRecord::A("web-acme.zeitwork.localhost".into(), [203, 0, 113, 7].into());

    // Pointing at the platform is not enough without the TXT record...
    let dns = start(vec![cname(), target()]);
    let err = verify().await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("_zeitwork-challenge.www.acme.test") && err.to_string().contains(&token), "{err}");
    drop(dns);
    // ...nor is a TXT record with another value (someone else's claim).
    let dns = start(vec![
        DnsRecord::Txt("_zeitwork-challenge.www.acme.test".into(), "zeitwork-verify-someone-else".into()),
        cname(),
        target(),
    ]);
    let err = verify().await.unwrap_err();
    assert!(err.to_string().contains("zeitwork-verify-someone-else"), "{err}");
    drop(dns);
    // The right TXT record, but the name points elsewhere.
    let dns = start(vec![
        DnsRecord::Txt("_zeitwork-challenge.www.acme.test".into(), token.clone()),
        DnsRecord::A("www.acme.test".into(), [198, 51, 100, 9].into()),
    ]);
    let err = verify().await.unwrap_err();
    assert!(
        err.to_string().contains("198.51.100.9") && err.to_string().contains("web-acme.zeitwork.localhost"),
        "{err}"
    );
    assert!(!routed().await);
    drop(dns);
    // Both right: verified, routed, listed as such.
    let _dns =
        start(vec![DnsRecord::Txt("_zeitwork-challenge.www.acme.test".into(), token.clone()), cname(), target()]);
    let v = verify().await.unwrap();
    assert_eq!((v["verified"].clone(), v["status"].clone()), (json!(true), json!("verified")), "{v}");
    assert!(v.get("message").is_none(), "{v}");
    // The routing table follows the store a moment later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !routed().await {
        assert!(std::time::Instant::now() < deadline, "a verified domain is routed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    op.shutdown().await;
}

/// A name claimed first by an org that does not control it (squatting) does
/// not keep the owner out: the owner adds it too, proves it with the TXT
/// record (dnsmasq answers), and takes it; the squatter's claim is removed,
/// audited, and a verified domain is refused to everyone else (409).
#[tokio::test]
async fn a_verified_claim_takes_a_domain_from_an_unverified_squatter() {
    use zeitwork_testkit::{DnsRecord, Dnsmasq};
    let dir = tempfile::tempdir().unwrap();
    let port = zeitwork_testkit::free_udp_port();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        dns_resolver: Some(([127, 0, 0, 1], port).into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    for (org, project) in [("acme", "web"), ("squat", "grab")] {
        admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": org})).await.unwrap();
        admin.post::<_, Value>("/api/v1/projects", &json!({"name": project, "org": org})).await.unwrap();
    }
    let add = |org: &str, project: &str| {
        let path = format!("/api/v1/projects/{org}/{project}/domains");
        let admin = admin.clone();
        async move { admin.post::<_, Value>(&path, &json!({"name": "shop.acme.test"})).await }
    };
    let listed = |org: &str, project: &str| {
        let path = format!("/api/v1/projects/{org}/{project}/domains");
        let admin = admin.clone();
        async move { admin.get::<Vec<Value>>(&path).await.unwrap() }
    };
    let verify = |org: &str, project: &str| {
        let path = format!("/api/v1/projects/{org}/{project}/domains/shop.acme.test/verify");
        let admin = admin.clone();
        async move { admin.post::<_, Value>(&path, &json!({})).await }
    };
    // The squatter claims it first; the owner's claim is taken all the same.
    let squatted = add("squat", "grab").await.unwrap();
    assert_eq!(squatted["status"], "unverified");
    let mine = add("acme", "web").await.unwrap();
    let token = mine["txt_value"].as_str().unwrap().to_owned();
    assert_ne!(squatted["txt_value"], mine["txt_value"], "each claim has its own challenge");
    assert_eq!(listed("squat", "grab").await.len(), 1);

    // The owner's DNS holds the owner's token.
    let _dns = Dnsmasq::start_on(
        port,
        &[
            DnsRecord::Txt("_zeitwork-challenge.shop.acme.test".into(), token.clone()),
            DnsRecord::Cname("shop.acme.test".into(), "web-acme.zeitwork.localhost".into()),
            DnsRecord::A("web-acme.zeitwork.localhost".into(), [203, 0, 113, 7].into()),
        ],
    )
    .unwrap();
    let err = verify("squat", "grab").await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let v = verify("acme", "web").await.unwrap();
    assert_eq!((v["verified"].clone(), v["org"].clone()), (json!(true), json!("acme")), "{v}");

    // The squatter's claim is gone, and said so in its org's audit log.
    assert!(listed("squat", "grab").await.is_empty());
    let events: Vec<Value> = admin.get("/api/v1/events?org=squat&action=domain.release").await.unwrap();
    assert!(
        events.iter().any(|e| e["target"] == "shop.acme.test" && e["project"] == "grab"),
        "no domain.release event for the squatter: {events:?}"
    );
    // A verified domain is refused to every other project, naming it.
    let err = add("squat", "grab").await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("shop.acme.test"), "{err}");
    let err = verify("squat", "grab").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    assert_eq!(listed("acme", "web").await.len(), 1);

    // The claim lifetime is a setting, checked at start.
    let err = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("other"),
        domain_claim_ttl_hours: 0,
        ..Default::default()
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("domain_claim_ttl_hours"), "{err}");
    op.shutdown().await;
}

/// A request body that stalls half-sent, or trickles in below the minimum
/// rate, is cut off with 408 and its connection closed; a body sent in pieces
/// at a fair pace is taken. Real TCP clients, byte by byte.
#[tokio::test]
async fn stalled_and_trickled_bodies_are_cut_off_with_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        body_idle_timeout_secs: 1,
        min_body_bytes_per_sec: 100,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = op.addr();
    let token = op.admin_token.clone().unwrap();
    let head = |len: usize| {
        format!(
            "POST /api/v1/orgs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
        )
    };
    // Everything the server says until it closes the connection (bounded, so a
    // server that never answers fails the test instead of hanging it).
    let answer = |mut s: tokio::net::TcpStream| async move {
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut all))
            .await
            .expect("the server closes the connection")
            .ok();
        String::from_utf8_lossy(&all).into_owned()
    };

    // Half a body, then silence.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("{}{{\"slug\":", head(40)).as_bytes()).await.unwrap();
    let said = answer(s).await;
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    assert!(said.contains("request_timeout") && said.contains("too slowly"), "{said}");

    // A byte every 200 ms: never idle for a second, but far below 100 bytes/s.
    let body = br#"{"slug":"trickled"}"#.repeat(10);
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head(body.len()).as_bytes()).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    let trickle = tokio::spawn(async move {
        for b in body {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut said = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), rd.read_to_end(&mut said))
        .await
        .expect("the server closes the connection")
        .ok();
    let said = String::from_utf8_lossy(&said);
    assert!(said.starts_with("HTTP/1.1 408"), "{said}");
    trickle.abort();

    // Two halves a moment apart, at a fair rate: created.
    let body = br#"{"slug":"paced"}"#;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head_close = head(body.len()).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    s.write_all(head_close.as_bytes()).await.unwrap();
    s.write_all(&body[..8]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(&body[8..]).await.unwrap();
    let said = answer(s).await;
    assert!(said.starts_with("HTTP/1.1 201"), "{said}");
    let orgs: Vec<Value> = Client::new(&format!("http://{addr}"), Some(token)).get("/api/v1/orgs").await.unwrap();
    assert!(orgs.iter().any(|o| o["slug"] == "paced"), "{orgs:?}");
    assert!(!orgs.iter().any(|o| o["slug"] == "trickled"), "{orgs:?}");
    op.shutdown().await;
}

/// A client that sends its request head too slowly is cut off, and one client
/// cannot hold more connections than its share; others' requests go on.
#[tokio::test]
async fn slow_and_greedy_clients_are_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        header_read_timeout_secs: 1,
        max_connections_per_client: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let addr = op.addr();
    // Whether the server closes the connection within `within` (whatever it says first).
    let closed = |mut s: tokio::net::TcpStream, within: Duration| async move {
        let mut buf = [0u8; 256];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    };
    // Three half-sent heads fill this client's share; a fourth connection is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        held.push(s);
    }
    // No wait needed: the server takes connections in the order the kernel
    // completed them, so the three above are counted before the fourth.
    let fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(closed(fourth, Duration::from_millis(500)).await, "a fourth connection is refused");
    // The slow ones are cut off after the header timeout...
    for s in held {
        assert!(closed(s, Duration::from_secs(3)).await, "a half-sent head is cut off");
    }
    // ...and the client is served again.
    let ok = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(ok.status(), 200);
    op.shutdown().await;
}
