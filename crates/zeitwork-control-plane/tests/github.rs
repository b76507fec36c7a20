//! GitHub intake with real webhook payloads (`@octokit/webhooks-examples`,
//! installed by scripts/test-deps): signatures, deliveries, push → deploy,
//! skips, redeliveries and manual triggers.

mod common;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use zeitwork_client::Client;

const SECRET: &str = "It's a Secret to Everybody, 2026";

/// The first example payload of `event` matching `pick`.
fn example(event: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../node_modules/@octokit/webhooks-examples/api.github.com/index.json");
    let text = std::fs::read_to_string(path)
        .expect("the webhook examples are needed: run scripts/test-deps (npm install @octokit/webhooks-examples)");
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let group = all.iter().find(|g| g["name"] == event).unwrap_or_else(|| panic!("no {event} examples"));
    group["examples"].as_array().unwrap().iter().find(|e| pick(e)).cloned().expect("a matching example")
}

fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(base: &str, event: &str, id: &str, body: &[u8], signature: Option<String>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/v1/github/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("x-hub-signature-256", s);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_deploy_and_every_delivery_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator(dir.path(), 15).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "github_repo": "Codertocat/Hello-World", "branch": "master",
                    "auto_deploy": true, "image_template": "registry.example.com/acme/web:sha-{sha}"}),
        )
        .await
        .unwrap();

    // Configuring: the secret is checked and never shown again.
    let short = admin
        .post::<_, Value>(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": "short"}),
        )
        .await
        .unwrap_err();
    assert_eq!(short.status(), Some(400), "{short}");
    let bad_repo = admin
        .post::<_, Value>("/api/v1/github/webhooks", &json!({"org": "Codertocat", "repo": "../x", "secret": SECRET}))
        .await
        .unwrap_err();
    assert_eq!(bad_repo.status(), Some(400), "{bad_repo}");
    let dev = org_client(&base, &admin, "acme", "developer").await;
    let denied = dev
        .post::<_, Value>(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET}),
        )
        .await
        .unwrap_err();
    assert_eq!(denied.status(), Some(403), "configuring a hook needs the admin role");
    let hook: Value = admin
        .post("/api/v1/github/webhooks", &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET}))
        .await
        .unwrap();
    assert_eq!(hook["path"], "/api/v1/github/webhook");
    assert!(!hook.to_string().contains(SECRET));

    // ping is answered.
    let mut ping = example("ping", |e| e["repository"].is_object());
    ping["repository"]["full_name"] = json!("Codertocat/Hello-World");
    let ping = serde_json::to_vec(&ping).unwrap();
    let (status, body) = deliver(&base, "ping", "ping-1", &ping, Some(sign(SECRET, &ping))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "answered");

    // A push to the project's branch deploys the template's image for the commit.
    let push = example("push", |e| e["ref"] == "refs/heads/master" && e["deleted"] == false);
    let sha = push["after"].as_str().unwrap().to_owned();
    let raw = serde_json::to_vec(&push).unwrap();
    let (status, body) = deliver(&base, "push", "push-1", &raw, Some(sign(SECRET, &raw))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "deployed");
    let dep = body["deployments"][0].as_str().unwrap().to_owned();
    let d: Value = admin.get(&format!("/api/v1/deployments/{dep}")).await.unwrap();
    assert_eq!(d["image"], format!("registry.example.com/acme/web:sha-{sha}"));
    assert_eq!(d["commit_sha"], sha.as_str());
    // A redelivery of the same delivery does not deploy twice.
    let (status, body) = deliver(&base, "push", "push-1", &raw, Some(sign(SECRET, &raw))).await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "duplicate");

    // Bad or missing signatures are refused and recorded; nothing is deployed.
    let (status, _) = deliver(&base, "push", "push-forged", &raw, Some(sign("not the secret at all!", &raw))).await;
    assert_eq!(status, 401);
    let (status, _) = deliver(&base, "push", "push-unsigned", &raw, None).await;
    assert_eq!(status, 401);
    let mut tampered = push.clone();
    tampered["after"] = json!("ffffffffffffffffffffffffffffffffffffffff");
    let tampered_raw = serde_json::to_vec(&tampered).unwrap();
    let (status, _) = deliver(&base, "push", "push-tampered", &tampered_raw, Some(sign(SECRET, &raw))).await;
    assert_eq!(status, 401, "a signature of another body does not count");

    // [skip ci], tags, other branches and deleted branches deploy nothing.
    let mut skip = push.clone();
    skip["head_commit"]["message"] = json!("docs: typo [skip ci]");
    let skip_raw = serde_json::to_vec(&skip).unwrap();
    let (status, body) = deliver(&base, "push", "push-skip", &skip_raw, Some(sign(SECRET, &skip_raw))).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("skipped")));
    let tag =
        serde_json::to_vec(&example("push", |e| e["ref"].as_str().unwrap_or("").starts_with("refs/tags/"))).unwrap();
    let (status, body) = deliver(&base, "push", "push-tag", &tag, Some(sign(SECRET, &tag))).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    let mut other = push.clone();
    other["ref"] = json!("refs/heads/feature");
    let other_raw = serde_json::to_vec(&other).unwrap();
    let (_, body) = deliver(&base, "push", "push-other", &other_raw, Some(sign(SECRET, &other_raw))).await;
    assert_eq!(body["status"], "ignored");
    // Events the hook does not act on are recorded as ignored.
    let star =
        serde_json::to_vec(&example("star", |e| e["repository"]["full_name"] == "Codertocat/Hello-World")).unwrap();
    let (status, body) = deliver(&base, "star", "star-1", &star, Some(sign(SECRET, &star))).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")));
    // Malformed deliveries.
    let (status, _) = deliver(&base, "push", "junk-1", b"{not json", Some(sign(SECRET, b"{not json"))).await;
    assert_eq!(status, 400);
    let elsewhere = br#"{"repository":{"full_name":"someone/else"}}"#;
    let (status, _) = deliver(&base, "push", "else-1", elsewhere, Some(sign(SECRET, elsewhere))).await;
    assert_eq!(status, 404);

    let deliveries: Vec<Value> = dev.get("/api/v1/github/webhooks/Codertocat/Hello-World/deliveries").await.unwrap();
    let status_of =
        |id: &str| deliveries.iter().find(|d| d["id"] == id).map(|d| d["status"].as_str().unwrap().to_owned());
    assert_eq!(status_of("ping-1").as_deref(), Some("answered"));
    assert_eq!(status_of("push-1").as_deref(), Some("deployed"));
    assert_eq!(status_of("push-forged").as_deref(), Some("rejected"));
    assert_eq!(status_of("push-skip").as_deref(), Some("skipped"));
    assert_eq!(status_of("star-1").as_deref(), Some("ignored"));
    let all: Vec<Value> = admin.get("/api/v1/deployments").await.unwrap();
    assert_eq!(all.len(), 1, "only the genuine push deployed: {all:?}");

    // Deploy by hand: a commit, or the branch's last pushed commit.
    let by_branch: Vec<Value> = dev
        .post("/api/v1/github/trigger", &json!({"org": "Codertocat", "repo": "Hello-World", "ref": "master"}))
        .await
        .unwrap();
    assert_eq!(by_branch[0]["commit_sha"], sha.as_str());
    let by_sha: Vec<Value> = dev
        .post("/api/v1/github/trigger", &json!({"org": "Codertocat", "repo": "Hello-World", "ref": "abc1234"}))
        .await
        .unwrap();
    assert_eq!(by_sha[0]["image"], "registry.example.com/acme/web:sha-abc1234");
    let unknown = dev
        .post::<_, Value>(
            "/api/v1/github/trigger",
            &json!({"org": "Codertocat", "repo": "Hello-World", "ref": "develop"}),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.status(), Some(409), "{unknown}");

    // A commit that was rolled back is not put live again by a push of it.
    op.store
        .set_deployment_status(&dep, zeitwork_api_types::DeploymentStatus::RolledBack, Some("5xx rate 100 %"))
        .await
        .unwrap();
    let (status, body) = deliver(&base, "push", "push-again", &raw, Some(sign(SECRET, &raw))).await;
    assert_eq!(body["status"], "failed", "{status} {body}");
    assert!(body["outcome"].as_str().unwrap_or("").contains("was rolled back"), "{body}");
    // By hand it may be tried again.
    let by_hand: Vec<Value> = dev
        .post("/api/v1/github/trigger", &json!({"org": "Codertocat", "repo": "Hello-World", "ref": sha}))
        .await
        .unwrap();
    assert_eq!(by_hand[0]["commit_sha"], sha.as_str());
    op.shutdown().await;
}

/// A token of `org` with `role`.
async fn org_client(base: &str, admin: &Client, org: &str, role: &str) -> Client {
    let t: Value = admin
        .post(
            "/api/v1/tokens",
            &json!({"name": format!("{org}-{role}"), "scope": {"kind": "org", "org": org, "role": role}}),
        )
        .await
        .unwrap();
    Client::new(base, Some(t["secret"].as_str().unwrap().to_owned()))
}

/// A second organisation that names another's repository can neither take
/// its webhook over, nor deploy its projects, nor read its deliveries, nor
/// deploy its uploaded images through the GitHub path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_organisation_cannot_hijack_a_repository() {
    const EVIL_SECRET: &str = "the attacker's own secret, 2026";
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator(dir.path(), 15).await;
    for org in ["acme", "evil"] {
        admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": org})).await.unwrap();
    }
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "github_repo": "Codertocat/Hello-World", "branch": "master",
                    "auto_deploy": true, "image_template": "registry.example.com/acme/web:sha-{sha}"}),
        )
        .await
        .unwrap();
    let acme = org_client(&base, &admin, "acme", "admin").await;
    let evil = org_client(&base, &admin, "evil", "admin").await;
    let evil_guest = org_client(&base, &admin, "evil", "guest").await;
    let hook: Value = acme
        .post("/api/v1/github/webhooks", &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET}))
        .await
        .unwrap();
    assert_eq!(hook["project_org"], "acme");

    // evil names acme's repository in its own project, templated on acme's private upload.
    let stolen = format!("archive.zeitwork/acme/web@sha256:{}", "a".repeat(64));
    evil.post::<_, Value>(
        "/api/v1/projects",
        &json!({"name": "web", "org": "evil", "github_repo": "Codertocat/Hello-World", "branch": "master",
                "auto_deploy": true, "image_template": stolen}),
    )
    .await
    .unwrap();
    // Reusing acme's secret would make deliveries ambiguous: refused.
    let same = evil
        .post::<_, Value>(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET}),
        )
        .await
        .unwrap_err();
    assert_eq!(same.status(), Some(400), "{same}");
    // Its own registration is its own: acme's stays.
    let theirs: Value = evil
        .post("/api/v1/github/webhooks", &json!({"org": "Codertocat", "repo": "Hello-World", "secret": EVIL_SECRET}))
        .await
        .unwrap();
    assert_eq!(theirs["project_org"], "evil");
    // Acting for acme with evil's token is refused.
    let as_acme = evil
        .post::<_, Value>(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": EVIL_SECRET, "project_org": "acme"}),
        )
        .await
        .unwrap_err();
    assert_eq!(as_acme.status(), Some(403), "{as_acme}");

    // acme's genuinely signed push still deploys acme's project, and only it.
    let push = example("push", |e| e["ref"] == "refs/heads/master" && e["deleted"] == false);
    let raw = serde_json::to_vec(&push).unwrap();
    let (status, body) = deliver(&base, "push", "acme-push", &raw, Some(sign(SECRET, &raw))).await;
    assert_eq!(status, 200, "{body}");
    let deps = body["deployments"].as_array().unwrap();
    assert_eq!(deps.len(), 1, "{body}");
    assert!(deps[0].as_str().unwrap().ends_with("-acme"), "{body}");

    // evil's signed push deploys nothing of acme's, and not acme's image either.
    let (status, body) = deliver(&base, "push", "evil-push", &raw, Some(sign(EVIL_SECRET, &raw))).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "failed", "{body}");
    assert!(body["outcome"].as_str().unwrap().contains("organisation"), "{body}");
    let all: Vec<Value> = admin.get("/api/v1/deployments").await.unwrap();
    assert_eq!(all.len(), 1, "only acme's push deployed: {all:?}");
    assert_eq!(all[0]["org"], "acme");

    // A manual trigger with evil's token deploys evil's projects only, and never acme's image.
    let trig = evil
        .post::<_, Value>(
            "/api/v1/github/trigger",
            &json!({"org": "Codertocat", "repo": "Hello-World", "ref": "abc1234"}),
        )
        .await
        .unwrap_err();
    assert_eq!(trig.status(), Some(400), "{trig}");
    let trig = evil
        .post::<_, Value>(
            "/api/v1/github/trigger",
            &json!({"org": "Codertocat", "repo": "Hello-World", "ref": "abc1234", "project_org": "acme"}),
        )
        .await
        .unwrap_err();
    assert_eq!(trig.status(), Some(403), "{trig}");

    // Each organisation reads its own deliveries only.
    let seen: Vec<Value> = evil_guest.get("/api/v1/github/webhooks/Codertocat/Hello-World/deliveries").await.unwrap();
    let ids: Vec<&str> = seen.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["evil-push"]);
    let seen: Vec<Value> = acme.get("/api/v1/github/webhooks/Codertocat/Hello-World/deliveries").await.unwrap();
    let ids: Vec<&str> = seen.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["acme-push"]);
    // A forged redelivery of acme's delivery id learns nothing of acme's outcome.
    let (status, body) = deliver(&base, "push", "acme-push", &raw, Some(sign(EVIL_SECRET, &raw))).await;
    assert_eq!(status, 202, "{body}");
    assert_ne!(body["status"], "duplicate", "{body}");
    op.shutdown().await;
}

/// What a local stand-in for GitHub's REST API received: (path, authorization, body).
type Received = std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>;

/// A stand-in for GitHub's REST API on loopback that records every call and answers 201.
async fn github_stand_in() -> (String, Received) {
    use axum::extract::State;
    let got: Received = Default::default();
    let app = axum::Router::new()
        .fallback(
            |State(got): State<Received>, uri: axum::http::Uri, headers: axum::http::HeaderMap, body: String| async move {
                let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                got.lock().unwrap().push((uri.path().to_owned(), auth, json));
                (axum::http::StatusCode::CREATED, "{}")
            },
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

/// Branches map to environments (branch → production, staging_branch →
/// staging), tags deploy when they match tag_pattern, skip markers skip, pull
/// requests get previews at `<project>-pr-<n>-<org>` (forks do not), closing a
/// pull request retires its preview, and every deployment of a commit is
/// reported to GitHub as a commit status (and a live preview as a comment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_tags_and_pull_requests_deploy_where_they_belong_and_report_to_github() {
    let dir = tempfile::tempdir().unwrap();
    let (api, got) = github_stand_in().await;
    let (op, base, admin) = common::operator_with(zeitwork_control_plane::OperatorConfig {
        data_dir: dir.path().to_owned(),
        github_api_url: api,
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    // A region without nodes: deployments wait there for room instead of failing at once,
    // so the engine leaves the preview this test activates by hand as it is.
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "DE"}))
        .await
        .unwrap();
    let bad = admin
        .post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme", "tag_pattern": "v(1"}))
        .await
        .unwrap_err();
    assert_eq!(bad.status(), Some(400), "an invalid tag_pattern is refused: {bad}");
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "web", "org": "acme", "regions": ["local"], "github_repo": "Codertocat/Hello-World", "branch": "master",
                    "staging_branch": "staging", "tag_pattern": "^v[0-9]+\\.", "auto_deploy": true,
                    "image_template": "registry.example.com/acme/web:sha-{sha}"}),
        )
        .await
        .unwrap();
    let hook: Value = admin
        .post(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET,
                    "events": ["push", "pull_request"], "token": "ghp_stand_in_token_1"}),
        )
        .await
        .unwrap();
    assert_eq!(hook["token"], true);
    assert!(!hook.to_string().contains("ghp_stand_in_token_1"));
    let env_of = |body: &Value| {
        let admin = admin.clone();
        let id = body["deployments"][0].as_str().map(str::to_owned);
        async move {
            let d: Value = admin.get(&format!("/api/v1/deployments/{}", id.expect("a deployment"))).await.unwrap();
            d
        }
    };
    let push = example("push", |e| e["ref"] == "refs/heads/master" && e["deleted"] == false);
    let sha = push["after"].as_str().unwrap().to_owned();
    let send = |event: &'static str, id: &'static str, payload: Value| {
        let base = base.clone();
        async move {
            let raw = serde_json::to_vec(&payload).unwrap();
            deliver(&base, event, id, &raw, Some(sign(SECRET, &raw))).await
        }
    };

    // branch → production, staging_branch → staging.
    let (status, body) = send("push", "p-main", push.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(env_of(&body).await["environment"], "production");
    let mut staging = push.clone();
    staging["ref"] = json!("refs/heads/staging");
    let (_, body) = send("push", "p-staging", staging).await;
    assert_eq!(body["status"], "deployed", "{body}");
    assert_eq!(env_of(&body).await["environment"], "staging");

    // Tags: a matching one deploys to production, another is ignored.
    let mut tag = push.clone();
    tag["ref"] = json!("refs/tags/v1.2.0");
    let (_, body) = send("push", "p-tag", tag.clone()).await;
    assert_eq!(body["status"], "deployed", "{body}");
    assert_eq!(env_of(&body).await["environment"], "production");
    tag["ref"] = json!("refs/tags/nightly");
    let (status, body) = send("push", "p-tag-2", tag).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("ignored")), "{body}");

    // Skip markers anywhere in the message, bracketed or not.
    for (i, m) in ["docs: skip ci", "wip [ci skip]", "CI SKIP for now"].iter().enumerate() {
        let mut skip = push.clone();
        skip["head_commit"]["message"] = json!(m);
        let id: &'static str = ["s-1", "s-2", "s-3"][i];
        let (_, body) = send("push", id, skip).await;
        assert_eq!(body["status"], "skipped", "{m}: {body}");
    }

    // A pull request: a preview of its head commit.
    let mut pr = example("pull_request", |e| e["action"] == "opened");
    let number = pr["number"].as_u64().unwrap();
    let head = pr["pull_request"]["head"]["sha"].as_str().unwrap().to_owned();
    pr["repository"]["full_name"] = json!("Codertocat/Hello-World");
    pr["pull_request"]["head"]["repo"]["full_name"] = json!("Codertocat/Hello-World");
    let (status, body) = send("pull_request", "pr-open", pr.clone()).await;
    assert_eq!(status, 200, "{body}");
    let preview = env_of(&body).await;
    assert_eq!(preview["environment"], "preview");
    assert_eq!(preview["pull_request"], number);
    assert_eq!(preview["commit_sha"], head.as_str());
    let preview_id = preview["id"].as_str().unwrap().to_owned();
    // Pull requests from forks are not built.
    let mut fork = pr.clone();
    fork["pull_request"]["head"]["repo"]["full_name"] = json!("mallory/Hello-World");
    let (_, body) = send("pull_request", "pr-fork", fork).await;
    assert_eq!(body["status"], "ignored", "{body}");

    // When the preview goes live it is served at <project>-pr-<n>-<org>, and GitHub hears of it.
    let audit = zeitwork_store::Audit::new("system", "deployment.activate", &preview_id).org("acme").project("web");
    op.store.activate_deployment(&preview_id, &audit).await.unwrap();
    let host = format!("web-pr-{number}-acme.zeitwork.localhost");
    // Wait for the address; should it never come, say what the deployment and the table look like.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let routes: Vec<Value> = admin.get("/api/v1/projects/acme/web/routing").await.unwrap();
        if routes.iter().any(|r| r["host"] == host.as_str() && r["deployment"] == preview_id.as_str()) {
            break;
        }
        if std::time::Instant::now() > deadline {
            let d: Value = admin.get(&format!("/api/v1/deployments/{preview_id}")).await.unwrap();
            panic!("the preview's address never came: deployment {d}, routes {routes:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let comment_path = format!("/repos/Codertocat/Hello-World/issues/{number}/comments");
    common::until("the preview comment", async || {
        got.lock()
            .unwrap()
            .iter()
            .any(|(p, _, b)| *p == comment_path && b["body"].as_str().unwrap_or("").contains(&host))
            .then_some(())
    })
    .await;
    let calls = got.lock().unwrap().clone();
    let statuses = |sha: &str| -> Vec<Value> {
        let path = format!("/repos/Codertocat/Hello-World/statuses/{sha}");
        calls.iter().filter(|(p, _, _)| *p == path).map(|(_, _, b)| b.clone()).collect()
    };
    assert!(calls.iter().all(|(_, auth, _)| auth == "Bearer ghp_stand_in_token_1"), "{calls:?}");
    let main_statuses = statuses(&sha);
    assert!(
        main_statuses.iter().any(|b| b["state"] == "pending" && b["context"] == "zeitwork/web/production"),
        "{main_statuses:?}"
    );
    assert!(main_statuses.iter().any(|b| b["context"] == "zeitwork/web/staging"), "{main_statuses:?}");
    let pr_statuses = statuses(&head);
    assert!(
        pr_statuses.iter().any(|b| b["state"] == "success" && b["target_url"].as_str().unwrap().contains(&host)),
        "{pr_statuses:?}"
    );

    // Closing the pull request retires its preview and frees the address.
    pr["action"] = json!("closed");
    let (_, body) = send("pull_request", "pr-close", pr).await;
    assert_eq!(body["status"], "closed", "{body}");
    let d: Value = admin.get(&format!("/api/v1/deployments/{preview_id}")).await.unwrap();
    assert_eq!(d["status"], "retired");
    common::until("the preview's address to go", async || {
        let routes: Vec<Value> = admin.get("/api/v1/projects/acme/web/routing").await.unwrap();
        (!routes.iter().any(|r| r["host"] == host.as_str())).then_some(())
    })
    .await;
    op.shutdown().await;
}
