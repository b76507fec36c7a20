//! What a build can reach, with real parts: buildah on the node building
//! Dockerfiles whose base image comes from a registry on loopback. A `RUN`
//! step reaches neither the operator's API, nor the node agent, nor a
//! service of the host (on loopback and on the host's own address): its
//! network namespace holds only its loopback. A `RUN --mount=type=cache`
//! of one organisation's project is never seen by another's. Each
//! organisation's log drain gets its own builds' output, and only that.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::build::BUILD_ID_BASE;
use zeitwork_node_agent::NodeAgent;

mod common;

/// How a step tries to reach something. Not `wget -T`: busybox 1.35's wget
/// crashes with it, which would look like an address it could not reach.
const WGET: &str = "busybox timeout 5 busybox wget -q -O /dev/null";

/// Lines a drain received, by path (`/acme`, `/other`).
type Received = Arc<Mutex<Vec<(String, Value)>>>;

/// A log drain receiver (HTTP, JSON batches) on loopback.
async fn drain_receiver() -> (SocketAddr, Received) {
    let got: Received = Arc::default();
    let sink = got.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri, body: axum::body::Bytes| {
        let sink = sink.clone();
        async move {
            if let Ok(Value::Array(lines)) = serde_json::from_slice::<Value>(&body) {
                sink.lock().unwrap().extend(lines.into_iter().map(|l| (uri.path().to_owned(), l)));
            }
            axum::http::StatusCode::NO_CONTENT
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

fn lines_at(got: &Received, path: &str) -> Vec<Value> {
    got.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, l)| l.clone()).collect()
}

/// A service of the host on every address: answers any connection with
/// `200 ok` and counts the connections.
async fn host_service() -> (u16, Arc<Mutex<Vec<SocketAddr>>>) {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, peer)) = listener.accept().await {
            log.lock().unwrap().push(peer);
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            });
        }
    });
    (port, seen)
}

/// The host's own IPv4 addresses on its other interfaces (global scope).
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip (iproute2) is needed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            Some(words.next()?.split('/').next()?.to_owned())
        })
        .collect()
}

/// A build context holding only `dockerfile`.
fn source(dockerfile: &str) -> Vec<u8> {
    source_of(&[("Dockerfile", dockerfile)])
}

/// A build context of `(path, contents)` files.
fn source_of(files: &[(&str, &str)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, body) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, path, body.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Builds `dockerfile` for `org`'s project `web` and waits for it to
/// succeed; the deployment's id and the build's output. The deployment is
/// deleted afterwards: only its build matters here.
async fn build(admin: &Client, org: &str, dockerfile: &str) -> (String, String) {
    let (id, log) = build_source(admin, org, source(dockerfile), Duration::from_secs(240)).await;
    admin.delete(&format!("/api/v1/deployments/{id}")).await.unwrap();
    (id, log)
}

/// Builds the source archive `src` for `org`'s project `web` and waits up to
/// `wait` for the build to succeed; the deployment's id and the build's output.
async fn build_source(admin: &Client, org: &str, src: Vec<u8>, wait: Duration) -> (String, String) {
    let up: Value = admin.upload(&format!("/api/v1/orgs/{org}/sources"), "application/gzip", src.into()).await.unwrap();
    let d: Value = admin
        .post("/api/v1/deployments", &json!({"org": org, "project": "web", "build": {"source": up["source"]}}))
        .await
        .unwrap();
    let id = d["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + wait;
    let status = loop {
        let b: Value = admin.get(&format!("/api/v1/deployments/{id}/build")).await.unwrap();
        if b["status"] == "succeeded" || b["status"] == "failed" {
            break b;
        }
        assert!(Instant::now() < deadline, "the build of {id} never ended: {b}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let log = admin.stream(&format!("/api/v1/deployments/{id}/build/log")).await.unwrap().text().await.unwrap();
    assert_eq!(status["status"], "succeeded", "{status}\n{log}");
    (id, log)
}

/// Whether a step printed `line` (the steps are echoed too, so whole lines only).
fn printed(log: &str, line: &str) -> bool {
    log.lines().any(|l| l.trim_end() == line)
}

/// What a step will try: the operator's API, the node agent, and a service of
/// the host on loopback and on each of the host's own addresses. From the host,
/// the same command reaches every one of them. The targets, the service's
/// connections, and how many the host's own tries made.
async fn targets(api: &str, agent: SocketAddr) -> (Vec<String>, Arc<Mutex<Vec<SocketAddr>>>, usize) {
    let (service, connections) = host_service().await;
    let mut targets = vec![
        format!("{}/health", api.trim_start_matches("http://")),
        format!("{agent}/health"),
        format!("127.0.0.1:{service}/"),
    ];
    targets.extend(host_addresses().into_iter().map(|a| format!("{a}:{service}/")));
    for t in &targets {
        let url = format!("http://{t}");
        let ok = tokio::task::spawn_blocking(move || {
            std::process::Command::new("/usr/bin/busybox")
                .args(WGET.split(' ').skip(1))
                .arg(url)
                .status()
                .unwrap()
                .success()
        })
        .await
        .unwrap();
        assert!(ok, "the host itself cannot reach {t}, so a step failing to proves nothing");
    }
    let from_host = connections.lock().unwrap().len();
    (targets, connections, from_host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_reach_no_service_and_no_other_tenant_and_their_output_reaches_their_orgs_drain() {
    let dir = tempfile::tempdir().unwrap();
    let registry = zeitwork_testkit::Registry::start().expect("a real registry");
    let base = registry.push_busybox("base", "1", "sleep 1000").await.unwrap();
    let project = |org: &str| json!({"name": "web", "org": org, "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    // The drains' receivers are on loopback, which organisations' drains may reach only when allowed.
    let config = OperatorConfig { drain_allowed_networks: vec!["127.0.0.0/8".into()], ..Default::default() };
    let (op, api, admin) = common::operator(dir.path(), config, project("acme")).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &project("other")).await.unwrap();
    let (drains, got) = drain_receiver().await;
    admin
        .post::<_, Value>(
            "/api/v1/orgs/acme/log-drains",
            &json!({"url": format!("http://{drains}/acme"), "sources": ["build"]}),
        )
        .await
        .unwrap();
    admin
        .post::<_, Value>("/api/v1/orgs/other/log-drains", &json!({"url": format!("http://{drains}/other")}))
        .await
        .unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    let agent =
        NodeAgent::start(common::agent_config(&api, token, dir.path(), "build-isolation", "10.200.0.0")).await.unwrap();

    let (targets, connections, from_host) = targets(&api, agent.addr()).await;

    let uid = BUILD_ID_BASE;
    let planter = format!(
        r#"FROM {base}
RUN for t in {targets}; do if {wget} "http://$t"; then echo "REACHED $t"; else echo "unreachable $t"; fi; done
RUN echo "interfaces: $(/bin/busybox tail -n +3 /proc/net/dev | /bin/busybox cut -d: -f1 | /bin/busybox tr -d ' ' | /bin/busybox tr '\n' ' ')"
RUN --mount=type=cache,id=deps,uid={uid},gid={uid},target=/cache echo from-acme > /cache/planted && echo planted-by-acme
"#,
        targets = targets.join(" "),
        wget = WGET.replace("busybox", "/bin/busybox"),
    );
    let (planted, log) = build(&admin, "acme", &planter).await;
    for t in &targets {
        assert!(printed(&log, &format!("unreachable {t}")), "no verdict on {t}:\n{log}");
        assert!(!printed(&log, &format!("REACHED {t}")), "a RUN step reached {t}:\n{log}");
    }
    assert_eq!(connections.lock().unwrap().len(), from_host, "the host's service saw a connection from the build");
    assert!(printed(&log, "interfaces: lo"), "a RUN step's network namespace holds only its loopback:\n{log}");
    assert!(printed(&log, "planted-by-acme"), "{log}");

    // Another organisation's project with the same cache mount finds it empty...
    let reader = format!(
        "FROM {base}\nRUN --mount=type=cache,id=deps,uid={uid},gid={uid},target=/cache \
         /bin/busybox cat /cache/planted 2>/dev/null || echo cache-empty\n"
    );
    let (read_by_other, log) = build(&admin, "other", &reader).await;
    assert!(printed(&log, "cache-empty") && !printed(&log, "from-acme"), "another tenant's cache mount:\n{log}");
    // ...while the project that filled it finds it again in its next build.
    let (_, log) = build(&admin, "acme", &reader).await;
    assert!(printed(&log, "from-acme"), "a project's cache mount lasts between its builds:\n{log}");
    // The cache mount lives in the project's own layer store.
    let stores = dir.path().join("agent/builds/cache");
    assert!(stores.join("acme/web/tmp/buildah-cache/deps/planted").is_file(), "acme's cache mount is not in its store");
    assert!(!stores.join("other/web/tmp/buildah-cache/deps/planted").exists());

    // Each organisation's drain gets its own builds' lines, and only those.
    let line_of = |path: &str, deployment: &str, message: &str| {
        lines_at(&got, path).into_iter().find(|l| l["deployment"] == deployment && l["message"] == message)
    };
    let line =
        common::until("acme's build line at its drain", async || line_of("/acme", &planted, "planted-by-acme")).await;
    assert_eq!((&line["org"], &line["project"], &line["stream"]), (&json!("acme"), &json!("web"), &json!("build")));
    common::until("other's build line at its drain", async || line_of("/other", &read_by_other, "cache-empty")).await;
    let acme = lines_at(&got, "/acme");
    assert!(acme.iter().all(|l| l["org"] == "acme" && l["stream"] == "build"), "{acme:?}");
    assert!(!acme.iter().any(|l| l["deployment"] == read_by_other.as_str()), "other's build at acme's drain");

    agent.shutdown().await;
    op.shutdown().await;
}

/// Processes of the host whose command name is `name`, and whose command line
/// holds `arg` (any when empty).
fn host_processes(name: &str, arg: &str) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .flatten()
        .filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .filter(|p| {
            let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(arg)
        })
        .count()
}

/// The same checks with `build_isolation = "vm"` on the QEMU runtime (TCG
/// here, slow but real): buildah runs inside a microVM booted with the
/// runtime's guest kernel, never on the host; a Dockerfile whose base image
/// comes from a loopback registry (handed to the guest on a disk) builds
/// with COPY and RUN, and the image runs; a `RUN` step reaches no service of
/// the host (the guest has no network device); the project's layer store
/// survives between its builds (the second build uses the cache); the
/// output reaches the organisation's drain; nothing of the VM is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vm_builds_run_buildah_in_a_microvm_that_reaches_nothing_and_keep_their_cache() {
    let dir = tempfile::tempdir().unwrap();
    let registry = zeitwork_testkit::Registry::start().expect("a real registry");
    let base = registry.push_busybox("base", "1", "sleep 1000").await.unwrap();
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let settings = OperatorConfig {
        build_memory_mib: 1024,
        build_vcpu: 1,
        build_disk_mib: 1024,
        build_timeout_secs: 900,
        // The drain receiver of this test listens on loopback.
        drain_allowed_networks: vec!["127.0.0.0/8".into()],
        ..OperatorConfig::default()
    };
    let (op, api, admin) = common::operator(dir.path(), settings, project).await;
    let (drains, got) = drain_receiver().await;
    admin
        .post::<_, Value>(
            "/api/v1/orgs/acme/log-drains",
            &json!({"url": format!("http://{drains}/acme"), "sources": ["build"]}),
        )
        .await
        .unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    let mut config = common::agent_config(&api, token, dir.path(), "build-vm", "10.185.0.0");
    config.runtime = "qemu".into();
    config.build_isolation = "vm".into();
    let agent = NodeAgent::start(config).await.unwrap();
    assert_eq!(agent.node().runtime, "qemu");
    let (targets, connections, from_host) = targets(&api, agent.addr()).await;

    let dockerfile = format!(
        r#"FROM {base}
COPY greeting.txt /www/greeting.txt
RUN for t in {targets}; do if {wget} "http://$t"; then echo "REACHED $t"; else echo "unreachable $t"; fi; done
RUN echo "interfaces: $(/bin/busybox tail -n +3 /proc/net/dev | /bin/busybox cut -d: -f1 | /bin/busybox tr -d ' ' | /bin/busybox tr '\n' ' ')"
RUN /bin/busybox cat /www/greeting.txt > /www/made && echo "made: $(/bin/busybox cat /www/made)"
ENTRYPOINT ["/bin/busybox", "sh", "-c", "/bin/busybox cat /www/made && exec /bin/busybox httpd -f -p $PORT -h /www"]
"#,
        targets = targets.join(" "),
        wget = WGET.replace("busybox", "/bin/busybox"),
    );
    let src = || source_of(&[("Dockerfile", &dockerfile), ("greeting.txt", "hello from a VM build\n")]);

    // Watch the host's processes during the builds: buildah never runs there,
    // a build VM does.
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (w, seen) = (watching.clone(), Arc::new(Mutex::new((0usize, 0usize))));
    let seen_by = seen.clone();
    // This agent's buildah would name its own data directory (`--root`); other
    // tests build on the host meanwhile.
    let ours = dir.path().display().to_string();
    let watcher = tokio::task::spawn_blocking(move || {
        while w.load(std::sync::atomic::Ordering::SeqCst) {
            let (buildah, vm) =
                (host_processes("buildah", &ours), host_processes("qemu-system-x86", "zeitwork-build-"));
            let mut s = seen_by.lock().unwrap();
            s.0 += buildah;
            s.1 += vm;
            drop(s);
            std::thread::sleep(Duration::from_millis(100));
        }
    });

    let (first, log) = build_source(&admin, "acme", src(), Duration::from_secs(900)).await;
    assert!(log.contains("in a microVM"), "{log}");
    for t in &targets {
        assert!(printed(&log, &format!("unreachable {t}")), "no verdict on {t}:\n{log}");
        assert!(!printed(&log, &format!("REACHED {t}")), "a RUN step reached {t}:\n{log}");
    }
    assert_eq!(connections.lock().unwrap().len(), from_host, "the host's service saw a connection from the build");
    assert!(printed(&log, "interfaces: lo"), "the build VM holds only a loopback:\n{log}");
    assert!(printed(&log, "made: hello from a VM build"), "{log}");

    // The same source again: its steps come from the project's layer store.
    let (second, again) = build_source(&admin, "acme", src(), Duration::from_secs(900)).await;
    watching.store(false, std::sync::atomic::Ordering::SeqCst);
    watcher.await.unwrap();
    let (buildah_seen, vm_seen) = *seen.lock().unwrap();
    assert_eq!(buildah_seen, 0, "buildah ran on the host");
    assert!(vm_seen > 0, "no build VM was seen on the host");
    assert!(again.contains("Using cache"), "the second build did not use the project's cache:\n{again}");
    assert!(!printed(&again, "made: hello from a VM build"), "a cached step ran again:\n{again}");
    let store = dir.path().join("agent/builds/cache/acme/web/store.ext4");
    assert_eq!(std::fs::metadata(&store).unwrap().len(), 1024 << 20, "the layer store is the disk limit's size");

    // The built image runs (its entrypoint needs the files COPY and RUN made):
    // the second deployment replaces the first.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let d: Value = admin.get(&format!("/api/v1/deployments/{second}")).await.unwrap();
        let old: Value = admin.get(&format!("/api/v1/deployments/{first}")).await.unwrap();
        if d["status"] == "active" {
            break;
        }
        assert!(old["status"] != "failed", "the built image did not run: {old}");
        assert!(d["status"] != "failed", "the built image did not run: {d}");
        assert!(Instant::now() < deadline, "the built image never became active: {d}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The build's lines reached the organisation's drain.
    common::until("the VM build's line at acme's drain", async || {
        lines_at(&got, "/acme").into_iter().find(|l| l["deployment"] == second.as_str() && l["stream"] == "build")
    })
    .await;
    // Nothing of the build VMs is left.
    let vms = dir.path().join("agent/builds/vms");
    let left: Vec<_> = std::fs::read_dir(&vms).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "build VMs left behind: {left:?}");
    let work: Vec<_> = std::fs::read_dir(dir.path().join("agent/builds/work"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(work.is_empty(), "build work directories left behind: {work:?}");

    agent.shutdown().await;
    op.shutdown().await;
}
