//! From a push to a URL with real parts: real GitHub webhook payloads
//! (`@octokit/webhooks-examples`) for a branch push, a staging push, a tag
//! push and a pull request, a git repository served over HTTP on loopback
//! (git's own "dumb" protocol, behind a token), buildah building each commit
//! on the node, runc running it, and the edge serving it at its address.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::{NodeAgent, NodeAgentConfig};

mod common;

const SECRET: &str = "a webhook secret of some length";
const TOKEN: &str = "ghs_installation_token_for_tests";

fn example(event: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../node_modules/@octokit/webhooks-examples/api.github.com/index.json");
    let text = std::fs::read_to_string(path)
        .expect("the webhook examples are needed: run scripts/test-deps (npm install @octokit/webhooks-examples)");
    let all: Vec<Value> = serde_json::from_str(&text).unwrap();
    let group = all.iter().find(|g| g["name"] == event).unwrap();
    group["examples"].as_array().unwrap().iter().find(|e| pick(e)).cloned().unwrap()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Commits `index.html` saying `text` on the current branch; its SHA.
fn commit(work: &Path, text: &str) -> String {
    std::fs::write(work.join("index.html"), format!("{text}\n")).unwrap();
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", text]);
    git(work, &["rev-parse", "HEAD"])
}

/// What the loopback server saw: POSTed (path, body), and GETs refused for a missing token.
#[derive(Default)]
struct Seen {
    posts: Vec<(String, Value)>,
    unauthorized: u32,
}

/// Serves `root` read-only over HTTP to requests carrying the repository
/// token (git's dumb protocol needs nothing more), and records POSTs (the
/// REST API's commit statuses and comments) answering 201.
async fn serve(root: PathBuf, seen: Arc<Mutex<Seen>>) -> String {
    use base64::Engine;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let basic =
        format!("basic {}", base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}")))
            .to_ascii_lowercase();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (root, seen, basic) = (root.clone(), seen.clone(), basic.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let head_end = loop {
                    let Ok(n) = sock.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or("").split(' ');
                let (method, target) = (first.next().unwrap_or(""), first.next().unwrap_or("/"));
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)))
                        .map(|(_, v)| v.trim().to_owned())
                };
                let path = target.split('?').next().unwrap_or("/").to_owned();
                let reply = if method == "POST" {
                    let len: usize = header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                    let mut body = buf[head_end..].to_vec();
                    while body.len() < len {
                        let Ok(n) = sock.read(&mut chunk).await else { return };
                        if n == 0 {
                            break;
                        }
                        body.extend_from_slice(&chunk[..n]);
                    }
                    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    seen.lock().unwrap().posts.push((path, json));
                    (201, b"{}".to_vec())
                } else if header("authorization").map(|a| a.to_ascii_lowercase()) != Some(basic) {
                    seen.lock().unwrap().unauthorized += 1;
                    (401, b"token needed".to_vec())
                } else {
                    let rel = path.trim_start_matches('/');
                    if rel.split('/').any(|p| p == "..") {
                        (400, Vec::new())
                    } else {
                        match tokio::fs::read(root.join(rel)).await {
                            Ok(b) => (200, b),
                            Err(_) => (404, Vec::new()),
                        }
                    }
                };
                let (code, body) = reply;
                let mut out = format!(
                    "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nWWW-Authenticate: Basic realm=\"git\"\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(&body);
                let _ = sock.write_all(&out).await;
            });
        }
    });
    format!("http://{addr}")
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver(base: &str, event: &str, id: &str, payload: &Value) -> Value {
    let raw = serde_json::to_vec(payload).unwrap();
    let res = reqwest::Client::new()
        .post(format!("{base}/api/v1/github/webhook"))
        .header("content-type", "application/json")
        .header("x-github-event", event)
        .header("x-github-delivery", id)
        .header("x-hub-signature-256", sign(&raw))
        .body(raw)
        .send()
        .await
        .unwrap();
    res.json().await.unwrap()
}

/// Waits until `host` answers 200 through the edge; its body.
async fn page(edge: std::net::SocketAddr, host: &str, want: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let res = reqwest::Client::new().get(format!("http://{edge}/")).header("host", host).send().await.unwrap();
        let status = res.status();
        let body = res.text().await.unwrap_or_default();
        if status == 200 && body.trim() == want {
            return body;
        }
        assert!(Instant::now() < deadline, "{host} never served {want:?}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn active(admin: &Client, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
        if d["status"] == "active" {
            return d;
        }
        if d["status"] == "failed" {
            let log = admin.stream(&format!("/api/v1/deployments/{id}/build/log")).await.unwrap().text().await;
            panic!("{id} failed: {d}\n{}", log.unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "{id} never became active: {d}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_tags_and_pull_requests_build_from_git_and_serve_their_urls() {
    let dir = tempfile::tempdir().unwrap();
    // The repository: main, a staging branch, a tag, a pull request's branch.
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    std::fs::copy("/usr/bin/busybox", work.join("busybox")).unwrap();
    std::fs::write(
        work.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY index.html /www/index.html\n\
         CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .unwrap();
    let main_sha = commit(&work, "production");
    git(&work, &["checkout", "-q", "-b", "staging"]);
    let staging_sha = commit(&work, "staging");
    git(&work, &["checkout", "-q", "main"]);
    let tag_sha = commit(&work, "tagged release");
    git(&work, &["tag", "v1.0.0"]);
    git(&work, &["checkout", "-q", "-b", "feature"]);
    let feature_sha = commit(&work, "preview");
    let served = dir.path().join("served");
    std::fs::create_dir_all(served.join("Codertocat")).unwrap();
    let bare = served.join("Codertocat/Hello-World.git");
    git(dir.path(), &["clone", "-q", "--bare", &work.display().to_string(), &bare.display().to_string()]);
    git(&bare, &["update-server-info"]);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let github = serve(served, seen.clone()).await;
    // The repository is private: a clone without the token is refused.
    let anonymous = Command::new("git")
        .args(["clone", "-q", &format!("{github}/Codertocat/Hello-World.git")])
        .arg(dir.path().join("anonymous"))
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap();
    assert!(!anonymous.status.success() && seen.lock().unwrap().unauthorized > 0);

    let config = OperatorConfig {
        apps_scheme: "http".into(),
        github_git_url: github.clone(),
        github_api_url: github.clone(),
        ..Default::default()
    };
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128},
                    "instances_per_region": 1, "github_repo": "Codertocat/Hello-World", "branch": "main",
                    "staging_branch": "staging", "tag_pattern": "^v[0-9]", "auto_deploy": true});
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin
        .post::<_, Value>(
            "/api/v1/github/webhooks",
            &json!({"org": "Codertocat", "repo": "Hello-World", "secret": SECRET,
                    "events": ["push", "pull_request"], "token": TOKEN}),
        )
        .await
        .unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent = NodeAgent::start(NodeAgentConfig {
        stop_grace_secs: 1,
        ..common::agent_config(&base, token, dir.path(), "builder-1", "10.239.0.0")
    })
    .await
    .unwrap();
    let edge = common::edge(&base, common::cluster_token(&admin, "edge-proxy").await, 0).await;
    let at = edge.http_addr();

    // A push to main: built from the clone, live at <project>-<org>.
    let mut push = example("push", |e| e["ref"] == "refs/heads/master" && e["deleted"] == false);
    push["ref"] = json!("refs/heads/main");
    push["after"] = json!(main_sha);
    push["head_commit"]["id"] = json!(main_sha);
    push["head_commit"]["message"] = json!("production");
    let r = deliver(&base, "push", "d-main", &push).await;
    assert_eq!(r["status"], "deployed", "{r}");
    let prod = active(&admin, r["deployments"][0].as_str().unwrap()).await;
    assert_eq!(prod["environment"], "production");
    assert!(prod["build_ms"].as_u64().is_some());
    page(at, "web-acme.zeitwork.localhost", "production").await;

    // The staging branch: a staging deployment, at its own address; production is untouched.
    let mut staging = push.clone();
    staging["ref"] = json!("refs/heads/staging");
    staging["after"] = json!(staging_sha);
    let r = deliver(&base, "push", "d-staging", &staging).await;
    let stage = active(&admin, r["deployments"][0].as_str().unwrap()).await;
    assert_eq!(stage["environment"], "staging");
    page(at, &format!("{}.zeitwork.localhost", stage["id"].as_str().unwrap()), "staging").await;
    // The project's layer cache survived the first build: its unchanged steps were not run again.
    let log = admin.stream(&format!("/api/v1/deployments/{}/build/log", stage["id"].as_str().unwrap())).await.unwrap();
    let log = log.text().await.unwrap();
    assert!(log.contains("Using cache"), "{log}");
    page(at, "web-acme.zeitwork.localhost", "production").await;

    // A tag matching tag_pattern: the tagged commit goes to production.
    let mut tag = example("push", |e| e["ref"].as_str().unwrap_or("").starts_with("refs/tags/"));
    tag["ref"] = json!("refs/tags/v1.0.0");
    tag["after"] = json!(tag_sha);
    tag["deleted"] = json!(false);
    let r = deliver(&base, "push", "d-tag", &tag).await;
    assert_eq!(r["status"], "deployed", "{r}");
    active(&admin, r["deployments"][0].as_str().unwrap()).await;
    page(at, "web-acme.zeitwork.localhost", "tagged release").await;

    // A pull request: a preview at <project>-pr-<n>-<org>; a redelivery builds nothing more.
    let mut pr = example("pull_request", |e| e["action"] == "opened");
    let number = pr["number"].as_u64().unwrap();
    pr["repository"]["full_name"] = json!("Codertocat/Hello-World");
    pr["pull_request"]["head"]["sha"] = json!(feature_sha);
    pr["pull_request"]["head"]["repo"]["full_name"] = json!("Codertocat/Hello-World");
    let r = deliver(&base, "pull_request", "d-pr", &pr).await;
    assert_eq!(r["status"], "deployed", "{r}");
    let preview = active(&admin, r["deployments"][0].as_str().unwrap()).await;
    assert_eq!(preview["pull_request"], number);
    let preview_host = format!("web-pr-{number}-acme.zeitwork.localhost");
    page(at, &preview_host, "preview").await;
    let again = deliver(&base, "pull_request", "d-pr", &pr).await;
    assert_eq!(again["status"], "duplicate");
    let previews: Vec<Value> = admin.get("/api/v1/projects/acme/web/deployments?environment=preview").await.unwrap();
    assert_eq!(previews.len(), 1, "one build per delivery");
    page(at, "web-acme.zeitwork.localhost", "tagged release").await;

    // GitHub heard about each commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let posts = seen.lock().unwrap().posts.clone();
        let success = |sha: &str| {
            posts
                .iter()
                .any(|(p, b)| *p == format!("/repos/Codertocat/Hello-World/statuses/{sha}") && b["state"] == "success")
        };
        let commented = posts.iter().any(|(p, b)| {
            *p == format!("/repos/Codertocat/Hello-World/issues/{number}/comments")
                && b["body"].as_str().unwrap_or("").contains(&preview_host)
        });
        if success(&main_sha) && success(&staging_sha) && success(&tag_sha) && success(&feature_sha) && commented {
            break;
        }
        assert!(Instant::now() < deadline, "statuses missing: {posts:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Closing the pull request retires the preview: its address stops serving.
    pr["action"] = json!("closed");
    let r = deliver(&base, "pull_request", "d-pr-close", &pr).await;
    assert_eq!(r["status"], "closed", "{r}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let res =
            reqwest::Client::new().get(format!("http://{at}/")).header("host", &preview_host).send().await.unwrap();
        if res.status() != 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed preview still serves");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    edge.shutdown().await;
    agent.shutdown().await;
    op.shutdown().await;
}

/// Packs a build context holding busybox and `dockerfile`.
fn source(dockerfile: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, mode: u32, body: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_size(body.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, name, body).unwrap();
    };
    add("Dockerfile", 0o644, dockerfile.as_bytes());
    add("busybox", 0o755, &std::fs::read("/usr/bin/busybox").unwrap());
    tar.into_inner().unwrap().finish().unwrap()
}

/// Builds that run over their time, memory or disk fail saying which limit,
/// and leave no process, working container or work directory behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_over_their_limits_fail_and_leave_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        OperatorConfig { build_timeout_secs: 10, build_memory_mib: 64, build_disk_mib: 96, ..Default::default() };
    let (op, base, admin) = common::operator(dir.path(), config, json!({"name": "web", "org": "acme"})).await;
    let agent_dir = dir.path().join("agent");
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent =
        NodeAgent::start(common::agent_config(&base, token, dir.path(), "builder-2", "10.241.0.0")).await.unwrap();
    let build = |dockerfile: &'static str| {
        let admin = admin.clone();
        async move {
            let up: Value =
                admin.upload("/api/v1/orgs/acme/sources", "application/gzip", source(dockerfile).into()).await.unwrap();
            let d: Value = admin
                .post(
                    "/api/v1/deployments",
                    &json!({"org": "acme", "project": "web", "build": {"source": up["source"]}}),
                )
                .await
                .unwrap();
            let id = d["id"].as_str().unwrap().to_owned();
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let d: Value = admin.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
                if d["status"] == "failed" {
                    return d["reason"].as_str().unwrap_or_default().to_owned();
                }
                assert_ne!(d["status"], "pending", "the build should have failed: {d}");
                assert!(Instant::now() < deadline, "the build never ended: {d}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let slow = build("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"60\"]\n").await;
    assert!(slow.contains("longer than its limit of 10 s"), "{slow}");
    let greedy = build(
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"dd\", \"if=/dev/zero\", \"of=/dev/null\", \"bs=256M\", \"count=1\"]\n",
    )
    .await;
    assert!(greedy.contains("137") || greedy.to_lowercase().contains("killed"), "killed for memory: {greedy}");
    let hoarder = build(
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox dd if=/dev/zero of=/big bs=1M count=200 && /bin/busybox sleep 30\"]\n",
    )
    .await;
    assert!(hoarder.contains("disk limit of 96 MiB"), "{hoarder}");

    // Nothing is left: no build processes, no working containers, no work directories.
    let store = agent_dir.join("builds/cache/acme/web");
    let containers = Command::new("buildah")
        .arg("--root")
        .arg(&store)
        .arg("--runroot")
        .arg(dir.path().join("inspect-run"))
        .args(["--storage-driver", "vfs", "containers", "--quiet"])
        .output()
        .unwrap();
    assert!(containers.status.success(), "{}", String::from_utf8_lossy(&containers.stderr));
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), "", "working containers left");
    let work: Vec<_> = std::fs::read_dir(agent_dir.join("builds/work")).unwrap().flatten().collect();
    assert!(work.is_empty(), "work directories left: {work:?}");
    let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let ps = String::from_utf8_lossy(&ps.stdout);
    assert!(!ps.lines().any(|l| l.contains(&store.display().to_string())), "build processes left:\n{ps}");
    agent.shutdown().await;
    op.shutdown().await;
}
