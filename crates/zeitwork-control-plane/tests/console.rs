//! The web console in a real browser: headless Chromium driven over WebDriver
//! (chromedriver) against an operator with a stand-in node agent. It signs in,
//! creates a project and deploys from the pages, watches the status go live
//! without a reload, follows logs, rolls back, checks escaping and CSRF, and
//! writes screenshots at desktop and phone widths under
//! `target/tmp/console-screenshots/`.
//!
//! Needs `chromium` and `chromium-driver` (scripts/test-deps installs them);
//! it fails, naming them, when they are missing.

mod common;
use common::until;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::extract::Path;
use axum::routing::get;
use base64::Engine;
use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};

/// Strings that would run script if any page put them into HTML unescaped.
const XSS_SCRIPT: &str = "<script>window.__xss=1</script>";
const XSS_ATTR: &str = "\"><img src=x onerror=\"window.__xss=2\">";

// ------------------------------------------------------------------ WebDriver

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/bin".into(), "/usr/lib/chromium".into()]) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A chromedriver process and one headless Chromium session.
struct Browser {
    http: reqwest::Client,
    url: String,
    driver: tokio::process::Child,
}

impl Browser {
    async fn start() -> Browser {
        let driver = find_program(&["chromedriver"]).expect(
            "the console test needs chromedriver and Chromium: apt-get install chromium chromium-driver (scripts/test-deps)",
        );
        let chromium = find_program(&["chromium", "chromium-browser", "google-chrome"])
            .expect("the console test needs Chromium: apt-get install chromium (scripts/test-deps)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        until("chromedriver to answer", async || {
            let r = http.get(format!("{base}/status")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,900", "--no-first-run", "--disable-extensions"],
            },
        }}});
        let res: Value = http.post(format!("{base}/session")).json(&caps).send().await.unwrap().json().await.unwrap();
        let id = res["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no browser session: {res}")).to_owned();
        Browser { http, url: format!("{base}/session/{id}"), driver: child }
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        if v["value"].get("error").is_some() {
            panic!("webdriver {path}: {}", v["value"]);
        }
        v["value"].clone()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        self.cmd(reqwest::Method::POST, path, Some(body)).await
    }

    async fn goto(&self, url: &str) {
        self.post("/url", json!({"url": url})).await;
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.post("/execute/sync", json!({"script": script, "args": args})).await
    }

    /// Evaluates `expr` until it is truthy; fails naming `what` after 30 s.
    async fn wait(&self, what: &str, expr: &str) -> Value {
        let script = format!("return ({expr});");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.js(&script, json!([])).await;
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            if Instant::now() > deadline {
                let body = self.js("return document.body ? document.body.innerText : ''", json!([])).await;
                panic!("timed out waiting for {what}; the page reads:\n{}", body.as_str().unwrap_or(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn element(&self, css: &str) -> String {
        let v = self.post("/element", json!({"using": "css selector", "value": css})).await;
        v.as_object().and_then(|o| o.values().next()).and_then(|v| v.as_str()).unwrap().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.element(css).await;
        self.post(&format!("/element/{el}/clear"), json!({})).await;
        self.post(&format!("/element/{el}/value"), json!({"text": text})).await;
    }

    async fn choose_file(&self, css: &str, path: &std::path::Path) {
        let el = self.element(css).await;
        self.post(&format!("/element/{el}/value"), json!({"text": path.to_str().unwrap()})).await;
    }

    async fn click(&self, css: &str) {
        let el = self.element(css).await;
        self.post(&format!("/element/{el}/click"), json!({})).await;
    }

    async fn text(&self, css: &str) -> String {
        let v = self
            .js("const e = document.querySelector(arguments[0]); return e ? e.textContent : null", json!([css]))
            .await;
        v.as_str().unwrap_or_else(|| panic!("no element {css}")).to_owned()
    }

    async fn path(&self) -> String {
        self.js("return location.pathname + location.search", json!([])).await.as_str().unwrap().to_owned()
    }

    async fn resize(&self, width: u32, height: u32) {
        self.post("/window/rect", json!({"width": width, "height": height})).await;
    }

    async fn screenshot(&self, name: &str) {
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), bytes).unwrap();
    }

    /// Browser console entries since the last call (chromedriver's log endpoint).
    async fn console(&self) -> Vec<Value> {
        self.post("/se/log", json!({"type": "browser"})).await.as_array().cloned().unwrap_or_default()
    }

    /// Console errors since the last call, less those `allowed` explains.
    async fn console_errors(&self, allowed: &[&str]) -> Vec<String> {
        self.console()
            .await
            .into_iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or("").to_owned())
            .filter(|m| !allowed.iter().any(|a| m.contains(a)))
            .collect()
    }

    /// Page weight and timing of the page on screen.
    async fn timing(&self) -> Value {
        self.js(
            "const n = performance.getEntriesByType('navigation')[0]; \
             const p = performance.getEntriesByName('first-contentful-paint')[0]; \
             const r = performance.getEntriesByType('resource').reduce((a, e) => a + e.encodedBodySize, 0); \
             return {server_ms: n.responseEnd - n.requestStart, paint_ms: p ? p.startTime : null, \
                     bytes: n.encodedBodySize + r};",
            json!([]),
        )
        .await
    }

    async fn accept_alert(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v: Value = self
                .http
                .post(format!("{}/alert/accept", self.url))
                .json(&json!({}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if v["value"].get("error").is_none() {
                return;
            }
            assert!(Instant::now() < deadline, "no confirmation dialog: {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Emulates the OS colour scheme (`light` or `dark`) through the DevTools protocol.
    async fn color_scheme(&self, scheme: &str) {
        let features = json!([{"name": "prefers-color-scheme", "value": scheme}]);
        self.post("/goog/cdp/execute", json!({"cmd": "Emulation.setEmulatedMedia", "params": {"features": features}}))
            .await;
    }

    async fn quit(mut self) {
        if let Err(e) = self.http.delete(&self.url).send().await {
            eprintln!("the browser session did not end: {e}");
        }
        self.url.clear();
        if let Err(e) = self.driver.kill().await {
            eprintln!("chromedriver did not stop: {e}");
        }
    }
}

impl Drop for Browser {
    /// A failed test still closes Chromium: chromedriver only ends the browsers of
    /// sessions it is asked to end (killing chromedriver would orphan them).
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Some(rest) = self.url.strip_prefix("http://") else { return };
        let Some((host, path)) = rest.split_once('/') else { return };
        let Ok(mut conn) = std::net::TcpStream::connect(host) else { return };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let req = format!("DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        if conn.write_all(req.as_bytes()).is_ok() {
            let _ = conn.read(&mut [0u8; 256]);
        }
    }
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots")
}

// ------------------------------------------------------------------ a stand-in node agent

/// Serves what the operator asks a node agent for: logs that follow (with a
/// line meant to break out of the page) and metrics.
async fn fake_agent() -> (String, tokio::task::JoinHandle<()>) {
    async fn logs(Path(id): Path<String>) -> axum::response::Response {
        let stream = futures::stream::unfold(0u64, move |n| {
            let id = id.clone();
            async move {
                if n > 0 {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
                let line = match n {
                    0 => format!("hello from {id}"),
                    1 => format!("user input: {XSS_SCRIPT} {XSS_ATTR}"),
                    _ => format!("tick {n}"),
                };
                let l = json!({"at": chrono::Utc::now(), "stream": "stdout", "line": line});
                Some((Ok::<_, std::convert::Infallible>(format!("{l}\n")), n + 1))
            }
        });
        axum::response::Response::new(axum::body::Body::from_stream(stream))
    }
    async fn metrics() -> axum::Json<Value> {
        let used = 40_000_000 + (chrono::Utc::now().timestamp_subsec_millis() as u64) * 10_000;
        axum::Json(
            json!({"memory_bytes": used, "memory_limit_bytes": 268435456u64, "cpu_seconds": 1.5, "processes": 3}),
        )
    }
    let app = axum::Router::new()
        .route("/v1/instances/{id}/logs", get(logs))
        .route("/v1/instances/{id}/metrics", get(metrics));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

/// Registers a node at `agent_url`, keeps it beating, and reports every
/// instance placed on it ready a moment after it appears (as a real agent
/// would once the instance started).
async fn simulate_node(base: &str, admin: &Client, agent_url: &str) -> tokio::task::JoinHandle<()> {
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": "agents", "scope": {"kind": "cluster", "role": "node-agent"}}))
        .await
        .unwrap();
    let agent = Client::new(base, Some(t["secret"].as_str().unwrap().to_owned()));
    let body = json!({"hostname": "node-a", "region": "eu", "address": agent_url,
                      "capacity": {"vcpu": 8, "memory": 8192}, "runtime": "container"});
    let node: Value = agent.post("/api/v1/nodes", &body).await.unwrap();
    let node_id = node["id"].as_str().unwrap().to_owned();
    let own = Client::new(base, Some(node["credential"].as_str().unwrap().to_owned()));
    let (admin, base, credential) = (admin.clone(), base.to_owned(), node["credential"].as_str().unwrap().to_owned());
    tokio::spawn(async move {
        let raw = reqwest::Client::new();
        let mut first_seen: std::collections::HashMap<String, Instant> = Default::default();
        loop {
            let _ = own.post_empty::<Value>(&format!("/api/v1/nodes/{node_id}/heartbeat")).await;
            let deployments: Vec<Value> = admin.get("/api/v1/deployments?limit=50").await.unwrap_or_default();
            for d in deployments {
                if !matches!(d["status"].as_str(), Some("pending" | "preparing" | "starting" | "waking")) {
                    continue;
                }
                let id = d["id"].as_str().unwrap();
                let list: Vec<Value> =
                    admin.get(&format!("/api/v1/deployments/{id}/instances")).await.unwrap_or_default();
                for i in list {
                    let iid = i["id"].as_str().unwrap().to_owned();
                    let seen = *first_seen.entry(iid.clone()).or_insert_with(Instant::now);
                    // Slow enough that the page sees the deployment before it is live.
                    if i["status"] != "ready" && seen.elapsed() > Duration::from_millis(4000) {
                        let _ = raw
                            .put(format!("{base}/api/v1/instances/{iid}/status"))
                            .bearer_auth(&credential)
                            .json(&json!({"status": "ready", "address": "10.237.0.2:8080"}))
                            .send()
                            .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

// ------------------------------------------------------------------ the test

/// Signs a plain HTTP client in with `token`; returns the cookie header and the CSRF token.
async fn sign_in_raw(base: &str, token: &str) -> (reqwest::StatusCode, String, String) {
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let page = http.get(format!("{base}/sign-in")).send().await.unwrap();
    let pairing = page.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_owned();
    let html = page.text().await.unwrap();
    let nonce = html.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let res = http
        .post(format!("{base}/sign-in"))
        .header("cookie", &pairing)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={nonce}&token={token}"))
        .send()
        .await
        .unwrap();
    let status = res.status();
    let session = res
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("zw_session="))
        .map(|v| v.split(';').next().unwrap().to_owned())
        .unwrap_or_default();
    let mut csrf = String::new();
    if !session.is_empty() {
        let home = http.get(format!("{base}/")).header("cookie", &session).send().await.unwrap().text().await.unwrap();
        csrf = home.split("name=\"csrf-token\" content=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    }
    (status, session, csrf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: data.clone(),
        default_instances_per_region: 1,
        apps_scheme: "http".into(),
        apps_port: Some(8083),
        ..Default::default()
    })
    .await;
    let admin_token = op.admin_token.clone().unwrap();
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "Europe", "country": "DE"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let (agent_url, agent_task) = fake_agent().await;
    let node_task = simulate_node(&base, &admin, &agent_url).await;
    let raw = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // ---- sign-in, CSRF and roles over plain HTTP
    let res = raw.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(res.status(), 303, "signed-out visitors go to the sign-in page");
    assert_eq!(res.headers()["location"], "/sign-in");
    let (status, session, _) = sign_in_raw(&base, "zw_aaaaaaaaaaaa_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb").await;
    assert_eq!((status.as_u16(), session.as_str()), (401, ""), "a wrong token opens no session");
    let res = raw
        .post(format!("{base}/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf=forged&token={admin_token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "a sign-in form from elsewhere is refused");
    let mut expired = zeitwork_control_plane::auth::mint(
        "old",
        zeitwork_api_types::TokenScope::Org { org: "acme".into(), role: zeitwork_api_types::Role::Admin },
        false,
        None,
        None,
    );
    expired.stored.token.expires_at = Some(chrono::Utc::now() - chrono::Duration::hours(1));
    op.store.create_token(&expired.stored, &zeitwork_store::Audit::new("test", "token.create", "old")).await.unwrap();
    let (status, session, _) = sign_in_raw(&base, &expired.bearer).await;
    assert_eq!((status.as_u16(), session.as_str()), (401, ""), "an expired token opens no session");

    let (status, cookie, csrf) = sign_in_raw(&base, &admin_token).await;
    assert_eq!(status, 303);
    assert!(!cookie.is_empty() && csrf.len() == 43, "{cookie} {csrf}");
    let create = |csrf: Option<&str>, name: &str| {
        let mut req = raw
            .post(format!("{base}/api/v1/projects"))
            .header("cookie", &cookie)
            .json(&json!({"org": "acme", "name": name}));
        if let Some(c) = csrf {
            req = req.header("x-csrf-token", c);
        }
        req.send()
    };
    assert_eq!(create(None, "forged").await.unwrap().status(), 403, "no CSRF token, no change");
    assert_eq!(create(Some("wrong"), "forged").await.unwrap().status(), 403, "a wrong CSRF token, no change");
    assert_eq!(admin.get::<Value>("/api/v1/projects/acme/forged").await.unwrap_err().status(), Some(404));
    assert_eq!(create(Some(&csrf), "api").await.unwrap().status(), 201, "the session's CSRF token allows the change");
    let res = raw.get(format!("{base}/api/v1/projects/acme/api")).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(res.status(), 200, "reads need no CSRF token");

    // Names the API refuses never reach a page; the ones it takes are shown as text.
    for (path, body) in [
        ("/api/v1/projects", json!({"org": "acme", "name": XSS_SCRIPT})),
        ("/api/v1/projects/acme/api/domains", json!({"name": XSS_ATTR})),
    ] {
        assert_eq!(admin.post::<_, Value>(path, &body).await.unwrap_err().status(), Some(400), "{path}");
    }
    let res = raw.put(format!("{base}/api/v1/projects/acme/api/env/{}", "%3Cscript%3E")).bearer_auth(&admin_token);
    assert_eq!(res.json(&json!({"value": "x"})).send().await.unwrap().status(), 400, "env keys are validated");
    admin.put::<_, Value>("/api/v1/projects/acme/api/env/GREETING", &json!({"value": XSS_ATTR})).await.unwrap();
    admin.post::<_, Value>("/api/v1/orgs/acme/members", &json!({"user": XSS_SCRIPT, "role": "guest"})).await.ok();
    let t: Value = admin
        .post("/api/v1/tokens", &json!({"name": XSS_ATTR, "scope": {"kind": "org", "org": "acme", "role": "guest"}}))
        .await
        .unwrap();
    let guest_token = t["secret"].as_str().unwrap().to_owned();

    // A Guest sees redacted values and no buttons that would fail.
    let (_, guest, _) = sign_in_raw(&base, &guest_token).await;
    let page = raw.get(format!("{base}/projects/acme/api/env")).header("cookie", &guest).send().await.unwrap();
    let html = page.text().await.unwrap();
    assert!(html.contains("redacted") && !html.contains("Delete") && !html.contains("Save"), "{html}");
    let html = raw
        .get(format!("{base}/projects/acme/api"))
        .header("cookie", &guest)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!html.contains("data-method"), "a Guest gets no action forms");
    assert!(html.contains("&lt;img src=x onerror="), "the guest token's name is shown escaped");
    for page in ["/", "/settings", "/audit", "/projects/acme/api/domains"] {
        let res = raw.get(format!("{base}{page}")).header("cookie", &guest).send().await.unwrap();
        assert_eq!(res.status(), 200, "{page}");
    }
    let denied: Vec<Value> = admin.get("/api/v1/events?result=denied").await.unwrap();
    let guest_id = t["id"].as_str().unwrap();
    assert!(
        !denied.iter().any(|e| e["actor"].as_str().unwrap_or("").contains(guest_id)),
        "browsing the console as a Guest asks for nothing it may not read: {denied:#?}"
    );
    // Sign-out needs its CSRF token.
    let res = raw
        .post(format!("{base}/sign-out"))
        .header("cookie", &guest)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("csrf=wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403, "sign-out needs the CSRF token too");

    // ---- the browser
    let b = Browser::start().await;
    b.goto(&format!("{base}/")).await;
    assert_eq!(b.path().await, "/sign-in");
    b.type_into("#token", "zw_notatoken").await;
    b.click("form[action='/sign-in'] button").await;
    b.wait("the wrong-token message", "document.querySelector('p.error')").await;
    assert!(b.text("p.error").await.contains("not valid"));
    b.screenshot("sign-in-wrong-token").await;
    b.console().await; // the 401 of the wrong token above is expected
    b.type_into("#token", &admin_token).await;
    b.click("form[action='/sign-in'] button").await;
    b.wait("the overview", "document.querySelector('h1') && document.querySelector('h1').textContent === 'Overview'")
        .await;
    let timing = b.timing().await;
    eprintln!("overview: {timing}");
    assert!(timing["server_ms"].as_f64().unwrap() < 200.0, "the overview took {timing}");
    assert!(timing["bytes"].as_u64().unwrap() < 100_000, "the overview weighs {timing}");

    // An organisation and a project from the page.
    b.click("details:has(#no-slug) summary").await;
    b.type_into("#no-slug", "beta").await;
    b.click("form[data-path='/api/v1/orgs'] button").await;
    b.wait(
        "the new organisation",
        "Array.from(document.querySelectorAll('#np-org option')).some(o => o.value === 'beta')",
    )
    .await;
    admin.get::<Value>("/api/v1/orgs/beta").await.unwrap();
    b.click("details:has(#np-name) summary").await;
    b.js("document.querySelector('#np-org').value = 'acme'", json!([])).await;
    b.type_into("#np-name", "web").await;
    b.click("form[data-path='/api/v1/projects'] button").await;
    b.wait("the project page", "location.pathname === '/projects/acme/web'").await;

    // A deployment from the page (an uploaded image archive), with a commit message meant to break out.
    let archive = dir.path().join("web.tar");
    let layers = vec![zeitwork_testkit::layer_tar(&[("www/", b""), ("www/index.html", b"hello\n")])];
    let config = zeitwork_image::archive::BuildConfig { cmd: vec!["/bin/httpd".into()], ..Default::default() };
    let mut tar = Vec::new();
    zeitwork_image::archive::write_oci_archive(&mut tar, &layers, &config).unwrap();
    std::fs::write(&archive, tar).unwrap();
    b.choose_file("#dp-archive", &archive).await;
    b.type_into("#dp-msg", &format!("fix {XSS_SCRIPT} {XSS_ATTR}")).await;
    b.click("form[data-path='/api/v1/deployments'] button").await;
    b.wait("the deployment page", "location.pathname.startsWith('/deployments/web-')").await;
    let first = b.path().await.trim_start_matches("/deployments/").to_owned();
    b.js("window.__loaded_once = true", json!([])).await;
    let shown = b.text(&format!("h1 [data-status-of='{first}']")).await;
    assert_ne!(shown, "active", "the deployment is not live yet when its page opens");
    b.wait(
        "the status to turn active on screen",
        &format!("document.querySelector(\"h1 [data-status-of='{first}']\").textContent === 'active'"),
    )
    .await;
    assert_eq!(b.js("return window.__loaded_once === true", json!([])).await, true, "the page did not reload");
    let timeline = b.text("#timeline").await;
    assert!(timeline.contains("→ active"), "the timeline gained the change: {timeline}");
    b.wait("logs that follow", "document.querySelector('#logs').textContent.includes('tick 3')").await;
    let logs = b.text("#logs").await;
    assert!(logs.contains(XSS_SCRIPT) && logs.contains(XSS_ATTR), "log lines are text: {logs}");
    b.wait("the memory sparkline", "document.querySelector('#spark polyline')").await;
    let commit = b.text("dl.facts").await;
    assert!(commit.contains(XSS_SCRIPT), "the commit message is shown as text: {commit}");
    b.screenshot("deployment-desktop").await;

    // A second deployment from the project page; the history gets its row live.
    b.goto(&format!("{base}/projects/acme/web")).await;
    b.js("window.__loaded_once = true", json!([])).await;
    b.type_into("#dp-image", "acme/web:2").await;
    let second: Value = admin
        .post(
            "/api/v1/deployments",
            &json!({"org": "acme", "project": "web", "image": "acme/web:2", "commit_sha": "abcdef1234"}),
        )
        .await
        .unwrap();
    let second = second["id"].as_str().unwrap().to_owned();
    b.wait(
        "a row for the new deployment",
        &format!("document.querySelector(\"#history [data-status-of='{second}']\")"),
    )
    .await;
    b.wait(
        "it to go live",
        &format!("document.querySelector(\"#history [data-status-of='{second}']\").textContent === 'active'"),
    )
    .await;
    b.wait(
        "the first one to stand by",
        &format!("document.querySelector(\"#history [data-status-of='{first}']\").textContent === 'standby'"),
    )
    .await;
    b.wait(
        "the current deployment's row to follow",
        &format!("document.querySelector(\"#current a[href='/deployments/{second}']\")"),
    )
    .await;
    assert_eq!(b.js("return window.__loaded_once === true", json!([])).await, true, "the page did not reload");
    b.goto(&format!("{base}/projects/acme/web")).await;
    // An uptime check added from the page is listed with its address.
    b.js("document.querySelector('#hc-path').closest('details').open = true", json!([])).await;
    b.type_into("#hc-path", "/healthz").await;
    b.click("form[data-path$='/health-checks'] button").await;
    b.wait(
        "the new uptime check",
        "document.querySelector('#checks') && document.querySelector('#checks').textContent.includes('/healthz')",
    )
    .await;
    b.screenshot("project-desktop").await;

    // Roll back from the first deployment's page.
    b.goto(&format!("{base}/deployments/{first}")).await;
    b.wait("the rollback button", "document.querySelector('form[data-path$=\"/rollback\"] button')").await;
    b.click("form[data-path$='/rollback'] button").await;
    until("production to point at the first deployment again", async || {
        let p: Value = admin.get("/api/v1/projects/acme/web").await.ok()?;
        (p["current_deployment"]["production"] == first.as_str()).then_some(())
    })
    .await;
    b.wait("the rolled-back deployment shown serving", "document.body.innerText.includes('(serving)')").await;
    b.wait(
        "its status active",
        &format!("document.querySelector(\"h1 [data-status-of='{first}']\").textContent === 'active'"),
    )
    .await;

    // Promote production's deployment to staging.
    b.wait("the promote form", "document.querySelector('form[data-path$=\"/promote\"] button')").await;
    b.js("document.querySelector('#pr-to').value = 'staging'", json!([])).await;
    b.click("form[data-path$='/promote'] button").await;
    until("staging to run the promoted deployment", async || {
        let p: Value = admin.get("/api/v1/projects/acme/web").await.ok()?;
        (p["current_deployment"]["staging"] == first.as_str()).then_some(())
    })
    .await;
    b.wait("the page after promoting", "document.body.innerText.includes('To stop it, roll back')").await;

    // A serving deployment offers no stop (the API would refuse); a standby one stops, after a confirmation.
    assert_eq!(b.js("return document.querySelector('form[data-path$=\"/stop\"]')", json!([])).await, Value::Null);
    b.goto(&format!("{base}/deployments/{second}")).await;
    b.click("form[data-path$='/stop'] button").await;
    b.accept_alert().await;
    until("the standby deployment to stop", async || {
        let d: Value = admin.get(&format!("/api/v1/deployments/{second}")).await.ok()?;
        (d["status"] != "standby").then_some(())
    })
    .await;

    // Env vars: one by one and a pasted .env; domains.
    b.goto(&format!("{base}/projects/acme/web/env")).await;
    b.type_into("#nv-key", "API_URL").await;
    b.type_into("#nv-value", XSS_ATTR).await;
    b.click("form[data-path$='/env/{key}'] button").await;
    b.wait(
        "the new variable",
        "document.querySelector('#env') && document.querySelector('#env').textContent.includes('API_URL')",
    )
    .await;
    b.type_into("#dotenv", "# settings\nexport PORT=8080\nNAME=\"web app\"\n").await;
    b.click("form[data-kind='dotenv'] button").await;
    b.wait(
        "the pasted variables",
        "document.querySelector('#env') && document.querySelector('#env').textContent.includes('PORT')",
    )
    .await;
    let v: Vec<Value> = admin.get("/api/v1/projects/acme/web/env").await.unwrap();
    let value = |k: &str| v.iter().find(|e| e["key"] == k).map(|e| e["value"].clone());
    assert_eq!(value("NAME"), Some(json!("web app")));
    assert_eq!(value("API_URL"), Some(json!(XSS_ATTR)));
    b.screenshot("env-desktop").await;
    b.goto(&format!("{base}/projects/acme/web/domains")).await;
    b.type_into("#nd-name", "www.example.com").await;
    b.click("form[data-path$='/domains'] button").await;
    b.wait("the domain row", "document.querySelector('#domains') && document.querySelector('#domains').textContent.includes('CNAME web-acme.zeitwork.localhost')").await;
    // The API's refusal (the domain is taken) shows on the page.
    b.type_into("#nd-name", "www.example.com").await;
    b.click("form[data-path$='/domains'] button").await;
    b.wait("the refusal", "!document.querySelector('form[data-path$=\"/domains\"] .error').hidden").await;
    let errors =
        b.console_errors(&["/domains - Failed to load resource: the server responded with a status of 409"]).await;
    assert!(errors.is_empty(), "console errors besides the expected 409: {errors:#?}");
    b.screenshot("domains-desktop").await;

    // Members & tokens, the audit log with a filter.
    b.goto(&format!("{base}/settings")).await;
    b.wait("the token list", "document.querySelector('#tokens')").await;
    b.type_into("#nt-name", "ci").await;
    b.click("form[data-path='/api/v1/tokens'] button").await;
    let secret = b
        .wait(
            "the new token's secret, shown once",
            "!document.querySelector('#secret').hidden && document.querySelector('#secret').textContent",
        )
        .await;
    let secret = secret.as_str().unwrap().rsplit(' ').next().unwrap().to_owned();
    let ci = Client::new(&base, Some(secret));
    assert_eq!(ci.get::<Vec<Value>>("/api/v1/projects?org=acme").await.unwrap().len(), 2, "the new token works");
    b.screenshot("settings-desktop").await;
    b.goto(&format!("{base}/audit?org=acme&action=deployment.rollback")).await;
    let audit = b.text("#audit").await;
    assert!(audit.contains("deployment.rollback") && !audit.contains("project.create"), "{audit}");
    b.goto(&format!("{base}/audit")).await;
    b.screenshot("audit-desktop").await;

    // Nothing injected ran, on any page.
    for page in ["/", "/projects/acme/api/env", "/settings", "/audit", &format!("/deployments/{first}")] {
        b.goto(&format!("{base}{page}")).await;
        let ran = b
            .js("return [window.__xss || 0, document.querySelectorAll('img, script:not([src])').length]", json!([]))
            .await;
        assert_eq!(ran, json!([0, 0]), "{page}: injected markup ran or became elements");
        let t = b.timing().await;
        eprintln!("{page}: {t}");
        assert!(t["server_ms"].as_f64().unwrap() < 200.0 && t["bytes"].as_u64().unwrap() < 100_000, "{page}: {t}");
    }
    b.goto(&format!("{base}/")).await;
    b.screenshot("overview-desktop").await;
    let errors = b.console_errors(&[]).await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    // A deployment built from source: its build log follows on the page, as text, and its failure shows.
    let mut context = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    let dockerfile = b"FROM scratch\nCOPY index.html /\n";
    for (name, data) in [("Dockerfile", &dockerfile[..]), ("index.html", b"hi\n")] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        context.append_data(&mut h, name, data).unwrap();
    }
    let context = context.into_inner().unwrap().finish().unwrap();
    let up: Value = admin.upload("/api/v1/orgs/acme/sources", "application/gzip", context.into()).await.unwrap();
    let body = json!({"org": "acme", "project": "web", "image": "", "build": {"source": up["source"]}, "environment": "preview"});
    let built: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
    let built = built["id"].as_str().unwrap().to_owned();
    b.goto(&format!("{base}/deployments/{built}")).await;
    b.wait("the build section", "document.querySelector('#build-log')").await;
    let nodes: Vec<Value> = admin.get("/api/v1/nodes").await.unwrap();
    let node = nodes[0]["id"].as_str().unwrap();
    let job: Value = admin.post_empty(&format!("/api/v1/nodes/{node}/builds/claim")).await.unwrap();
    assert_eq!(job["id"], built.as_str());
    let report = |path: String, body: reqwest::Body, ctype: &'static str| {
        raw.post(format!("{base}{path}")).bearer_auth(&admin_token).header("content-type", ctype).body(body).send()
    };
    let log = format!("STEP 1/2: FROM scratch\nSTEP 2/2: COPY {XSS_SCRIPT} {XSS_ATTR}\n");
    report(format!("/api/v1/builds/{built}/log"), log.into(), "text/plain").await.unwrap().error_for_status().unwrap();
    b.wait("the build output", "document.querySelector('#build-log').textContent.includes('STEP 2/2')").await;
    assert!(b.text("#build-log").await.contains(XSS_ATTR), "build output is text");
    let failure = json!({"error": format!("COPY failed: {XSS_SCRIPT}")}).to_string();
    report(format!("/api/v1/builds/{built}/fail"), failure.into(), "application/json")
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    b.wait("the build to show failed", "document.querySelector('#build-status').textContent === 'failed'").await;
    b.wait(
        "the deployment to show failed",
        &format!("document.querySelector(\"h1 [data-status-of='{built}']\").textContent === 'failed'"),
    )
    .await;
    assert_eq!(
        b.js("return [window.__xss || 0, document.querySelectorAll('img').length]", json!([])).await,
        json!([0, 0])
    );
    b.screenshot("build-desktop").await;

    // Phone width.
    b.resize(390, 844).await;
    for (name, page) in [
        ("overview", "/".to_owned()),
        ("project", "/projects/acme/web".into()),
        ("deployment", format!("/deployments/{first}")),
    ] {
        b.goto(&format!("{base}{page}")).await;
        let overflow = b.js("return document.documentElement.scrollWidth - window.innerWidth", json!([])).await;
        let wide = b
            .js(
                "return [...document.querySelectorAll('body *')].filter(e => !(e.parentElement && e.parentElement.closest('.scroll')) && e.getBoundingClientRect().right > window.innerWidth + 1).slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)",
                json!([]),
            )
            .await;
        assert!(overflow.as_i64().unwrap() <= 0, "{name} scrolls sideways on a phone: {overflow}, too wide: {wide}");
        b.screenshot(&format!("{name}-phone")).await;
    }
    b.resize(1280, 900).await;
    b.color_scheme("dark").await;
    for (name, page) in [("overview", "/".to_owned()), ("deployment", format!("/deployments/{first}"))] {
        b.goto(&format!("{base}{page}")).await;
        let bg = b.js("return getComputedStyle(document.documentElement).backgroundColor", json!([])).await;
        assert_eq!(bg, "rgb(17, 20, 24)", "dark colours follow the OS setting");
        b.screenshot(&format!("{name}-dark")).await;
    }
    b.color_scheme("light").await;

    // The event stream drops (the operator stops): a banner, changes disabled; it comes back on its own.
    b.goto(&format!("{base}/deployments/{first}")).await;
    b.wait(
        "the stream to be open",
        "document.querySelector('#banner').hidden === true && window.zwStream && window.zwStream.readyState === 1",
    )
    .await;
    let addr = op.addr();
    op.abort();
    b.wait("the read-only banner", "document.querySelector('#banner').hidden === false").await;
    assert_eq!(
        b.js("return document.querySelector('form[data-path$=\"/promote\"] button').disabled", json!([])).await,
        true
    );
    b.screenshot("stream-dropped").await;
    let op = Operator::start(OperatorConfig {
        listen: addr,
        data_dir: data,
        apps_scheme: "http".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    b.wait("the stream to come back", "document.querySelector('#banner').hidden === true").await;
    assert_eq!(
        b.js("return document.querySelector('form[data-path$=\"/promote\"] button').disabled", json!([])).await,
        false
    );

    // Sign out from the page.
    b.click("form[action='/sign-out'] button").await;
    b.wait("the sign-in page", "location.pathname === '/sign-in'").await;
    b.goto(&format!("{base}/settings")).await;
    assert_eq!(b.path().await, "/sign-in", "the ended session no longer opens pages");

    b.quit().await;
    node_task.abort();
    agent_task.abort();
    op.shutdown().await;
    eprintln!("screenshots in {}", screenshots().display());
}

/// A stand-in for GitHub's OAuth and REST endpoints: the code names the user.
async fn fake_github() -> (String, tokio::task::JoinHandle<()>) {
    async fn token(body: String) -> axum::Json<Value> {
        let code = body.split('&').find_map(|kv| kv.strip_prefix("code=")).unwrap_or("").to_owned();
        axum::Json(json!({"access_token": format!("gho_{code}"), "token_type": "bearer"}))
    }
    fn login(headers: &axum::http::HeaderMap) -> String {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        auth.trim_start_matches("Bearer gho_").to_owned()
    }
    async fn user(headers: axum::http::HeaderMap) -> axum::Json<Value> {
        axum::Json(json!({"login": login(&headers), "id": 1}))
    }
    async fn orgs(headers: axum::http::HeaderMap) -> axum::Json<Value> {
        let org = if login(&headers) == "alice" { "AcmeCorp" } else { "elsewhere" };
        axum::Json(json!([{"login": org, "id": 2}]))
    }
    let app = axum::Router::new()
        .route("/login/oauth/access_token", axum::routing::post(token))
        .route("/user", get(user))
        .route("/user/orgs", get(orgs));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (format!("http://{addr}"), task)
}

fn set_cookie(res: &reqwest::Response, name: &str) -> Option<String> {
    res.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_sign_in_maps_organisation_membership_to_a_role() {
    use zeitwork_control_plane::config::{GithubOAuth, GithubOrgRole};
    let (gh, gh_task) = fake_github().await;
    let dir = tempfile::tempdir().unwrap();
    let (op, base, admin) = common::operator_with(OperatorConfig {
        data_dir: dir.path().join("data"),
        github_oauth: Some(GithubOAuth {
            client_id: "Iv1.console".into(),
            client_secret: "s3cret".into(),
            authorize_url: format!("{gh}/login/oauth/authorize"),
            token_url: format!("{gh}/login/oauth/access_token"),
            api_url: gh.clone(),
            orgs: vec![GithubOrgRole {
                github_org: "acmecorp".into(),
                org: "acme".into(),
                role: zeitwork_api_types::Role::Developer,
            }],
        }),
        ..Default::default()
    })
    .await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let page = http.get(format!("{base}/sign-in")).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("href=\"/auth/github\""), "the sign-in page offers GitHub");
    let start = |http: reqwest::Client| {
        let base = base.clone();
        async move {
            let res = http.get(format!("{base}/auth/github")).send().await.unwrap();
            assert_eq!(res.status(), 303);
            let to = res.headers()["location"].to_str().unwrap().to_owned();
            assert!(to.starts_with(&format!("{gh}/login/oauth/authorize?client_id=Iv1.console")), "{to}");
            let state = to.split("state=").nth(1).unwrap().to_owned();
            (set_cookie(&res, "zw_oauth").unwrap(), state)
        }
    };
    let (oauth, state) = start(http.clone()).await;
    let callback = |code: &str, state: &str, cookie: &str| {
        http.get(format!("{base}/auth/github/callback?code={code}&state={state}")).header("cookie", cookie).send()
    };

    let res = callback("alice", "forged", &oauth).await.unwrap();
    assert_eq!(res.headers()["location"], "/sign-in?error=github", "a state this browser was not given is refused");
    let res = callback("bob", &state, &oauth).await.unwrap();
    assert_eq!(res.headers()["location"], "/sign-in?error=github-role", "no mapped organisation, no session");

    let res = callback("alice", &state, &oauth).await.unwrap();
    assert_eq!(res.status(), 200);
    let session = set_cookie(&res, "zw_session").expect("a session cookie");
    let home = http.get(format!("{base}/")).header("cookie", &session).send().await.unwrap().text().await.unwrap();
    assert!(home.contains("github:alice · developer of acme"), "{home}");
    let tokens: Vec<Value> = admin.get("/api/v1/tokens").await.unwrap();
    assert!(tokens.iter().any(|t| t["name"] == "github:alice"));

    // Signing out deletes the token the sign-in minted.
    let csrf = home.split("name=\"csrf-token\" content=\"").nth(1).unwrap().split('"').next().unwrap().to_owned();
    let res = http
        .post(format!("{base}/sign-out"))
        .header("cookie", &session)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["location"], "/sign-in");
    let tokens: Vec<Value> = admin.get("/api/v1/tokens").await.unwrap();
    assert!(!tokens.iter().any(|t| t["name"] == "github:alice"), "{tokens:?}");
    let res = http.get(format!("{base}/")).header("cookie", &session).send().await.unwrap();
    assert_eq!(res.headers()["location"], "/sign-in?ended=1");
    let res = http.get(format!("{base}/api/v1/projects")).header("cookie", &session).send().await.unwrap();
    assert_eq!(res.status(), 401, "the API no longer takes the ended session");

    gh_task.abort();
    op.shutdown().await;
}
