//! From source to URL with real parts: `zeitwork up` (operator, node agent
//! with runc, edge), buildah as the builder, a real OCI registry holding the
//! base image, and the CLI packing a directory.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_zeitwork");

struct Up {
    child: Child,
    api: String,
    token: String,
    http: u16,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn up(data: &Path, range: &str) -> Up {
    let ports: Vec<u16> = (0..4).map(|_| zeitwork_testkit::free_port()).collect();
    let child = Command::new(BIN)
        .args(["up", "--no-install", "--runtime", "container", "--log", "warn", "--instance-range", range])
        .arg("--data")
        .arg(data)
        .args(["--api-port", &ports[0].to_string(), "--agent-port", &ports[1].to_string()])
        .args(["--http-port", &ports[2].to_string(), "--https-port", &ports[3].to_string()])
        .env_remove("ZEITWORK_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Stopped on drop, also when it does not come up.
    let mut u = Up { child, api: format!("http://127.0.0.1:{}", ports[0]), token: String::new(), http: ports[2] };
    let token_file = data.join("admin.token");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "zeitwork up did not start");
        if std::net::TcpStream::connect(("127.0.0.1", ports[2])).is_ok() && token_file.exists() {
            u.token = std::fs::read_to_string(&token_file).unwrap().trim().to_owned();
            return u;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn cli(u: &Up, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("ZEITWORK_API", &u.api)
        .env("ZEITWORK_TOKEN", &u.token)
        .env("HOME", "/nonexistent")
        .env("BUILD_TOKEN", "s3cr3t-build-token")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn write(dir: &Path, name: &str, body: &str) {
    std::fs::write(dir.join(name), body).unwrap();
}

async fn get(url: &str, http: u16) -> (u16, String) {
    let host = url.trim_start_matches("http://").split(':').next().unwrap().to_owned();
    let edge: std::net::SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let res = reqwest::Client::builder().resolve(&host, edge).build().unwrap().get(url).send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// A multi-stage Dockerfile (base image from a loopback registry, COPY, RUN,
/// ARG, a secret, CMD) deploys from a directory with `deploy --source` and
/// serves; the build cannot reach the operator; a broken Dockerfile fails
/// with the builder's error shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_with_a_dockerfile_becomes_a_live_url() {
    let registry = zeitwork_testkit::Registry::start().expect("a real registry");
    let base = registry.push_busybox("base", "1", "sleep 1000").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let u = up(&data.path().join("zw"), "10.238.0.0");
    let port = u.api.rsplit(':').next().unwrap().to_owned();
    assert!(cli(&u, &["orgs", "create", "acme"]).status.success());
    let created = cli(&u, &["projects", "create", "acme/web", "--port", "8080", "--memory", "128"]);
    assert!(created.status.success(), "{:?}", text(&created));

    let src = data.path().join("app");
    std::fs::create_dir_all(src.join("node_modules")).unwrap();
    std::fs::copy("/usr/bin/busybox", src.join("busybox")).unwrap();
    write(&src, ".dockerignore", "node_modules\n");
    write(&src, "node_modules/huge.bin", "left out");
    write(
        &src,
        "Dockerfile",
        &format!(
            r#"FROM {base} AS build
ARG GREETING=unset
RUN /bin/busybox mkdir -p /out && echo "$GREETING from source" > /out/index.html
RUN --mount=type=secret,id=token /bin/busybox test "$(/bin/busybox cat /run/secrets/token)" = s3cr3t-build-token && echo secret-seen
RUN (/bin/busybox timeout 5 /bin/busybox wget -q -O- http://127.0.0.1:{port}/health && echo REACHED-OPERATOR) || echo operator-unreachable
COPY . /ctx
RUN test ! -e /ctx/node_modules && test -e /ctx/busybox && echo ignored-files-left-out
FROM scratch
COPY busybox /bin/busybox
COPY --from=build /out /www
CMD ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
"#
        ),
    );
    let dir = src.display().to_string();
    let out = cli(
        &u,
        &[
            "deploy",
            "acme/web",
            "--source",
            &dir,
            "--build-arg",
            "GREETING=hello",
            "--build-secret",
            "token=BUILD_TOKEN",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "deploy --source failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("Building") && stdout.contains("  │ "), "the build output streams:\n{stdout}");
    // Lines a RUN step printed (the steps themselves are echoed too, so match whole lines).
    let printed = |what: &str| stdout.lines().any(|l| l.trim_end() == format!("  │ {what}"));
    assert!(printed("secret-seen"), "the build secret reached RUN:\n{stdout}");
    assert!(!stdout.contains("s3cr3t-build-token"), "the secret is never printed:\n{stdout}");
    assert!(printed("operator-unreachable") && !printed("REACHED-OPERATOR"), "{stdout}");
    assert!(printed("ignored-files-left-out"), ".dockerignore is honoured:\n{stdout}");
    let url = stdout
        .lines()
        .filter(|l| l.starts_with("Live:"))
        .find_map(|l| l.split_whitespace().find(|w| w.starts_with("http://")))
        .unwrap_or_else(|| panic!("no URL:\n{stdout}"))
        .to_owned();
    let (status, body) = get(&url, u.http).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.trim(), "hello from source");

    // The build stays readable, through the CLI and the API.
    let id = url.trim_start_matches("http://").split('.').next().unwrap().to_owned();
    let logs = cli(&u, &["logs", &id, "--build"]);
    assert!(text(&logs).0.lines().any(|l| l == "secret-seen"), "{:?}", text(&logs));
    let client = zeitwork_client::Client::new(&u.api, Some(u.token.clone()));
    let build: serde_json::Value = client.get(&format!("/api/v1/deployments/{id}/build")).await.unwrap();
    assert_eq!(build["status"], "succeeded", "{build}");
    assert_eq!(build["secrets"], serde_json::json!(["token"]));
    let d: serde_json::Value = client.get(&format!("/api/v1/deployments/{id}")).await.unwrap();
    assert!(d["build_ms"].as_u64().is_some(), "{d}");
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", u.api))
        .bearer_auth(&u.token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("zeitwork_operator_builds_total{outcome=\"succeeded\"} 1"), "{metrics}");

    // A second build with another argument: the first one's image is pruned from the
    // project's layer store, whose latest steps stay as the cache.
    let out = cli(
        &u,
        &[
            "deploy",
            "acme/web",
            "--source",
            &dir,
            "--build-arg",
            "GREETING=again",
            "--build-secret",
            "token=BUILD_TOKEN",
        ],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "the second build failed:\n{stdout}\n{stderr}");
    let (status, body) = get(&url, u.http).await;
    assert_eq!((status, body.trim()), (200, "hello from source"), "the first deployment keeps its own version");
    // `zeitwork up` keeps the node agent's data under DATA/agent.
    let store = data.path().join("zw/agent/builds/cache/acme/web");
    assert!(store.is_dir(), "no layer store at {}", store.display());
    let images = |filter: &[&str]| {
        let o = Command::new("buildah")
            .args([
                "--root",
                &store.display().to_string(),
                "--runroot",
                &data.path().join("runroot").display().to_string(),
            ])
            .args(["--storage-driver", "vfs", "images", "--quiet"])
            .args(filter)
            .output()
            .unwrap();
        assert!(o.status.success(), "{:?}", text(&o));
        String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect::<Vec<_>>()
    };
    assert_eq!(images(&["--filter", "dangling=true"]), Vec::<String>::new(), "earlier builds' images are pruned");
    assert!(!images(&["--all"]).is_empty(), "the latest build's steps stay as the cache");

    // A Dockerfile that fails: the deployment fails with the builder's error and the output's tail.
    write(&src, "Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sh\", \"-c\", \"echo about-to-fail; exit 3\"]\n");
    let out = cli(&u, &["deploy", "acme/web", "--source", &dir]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a broken build must fail:\n{stdout}");
    assert!(stderr.contains("build failed") && stderr.contains("about-to-fail"), "{stderr}");
    assert!(
        stderr.contains("exit status 3") || stderr.contains("exit code 3") || stderr.contains("exited with"),
        "{stderr}"
    );
    // The live deployment is untouched.
    let (status, body) = get(&url, u.http).await;
    assert_eq!((status, body.trim()), (200, "hello from source"));

    // A source without a Dockerfile is refused before anything is stored.
    let empty = data.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = cli(&u, &["deploy", "acme/web", "--source", &empty.display().to_string()]);
    assert!(!out.status.success());
    assert!(text(&out).1.contains("no Dockerfile"), "{:?}", text(&out));
}
