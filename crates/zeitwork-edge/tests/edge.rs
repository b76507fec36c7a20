//! The edge proxy end to end: a real operator (SQLite) publishing the routing
//! table, plain upstream HTTP servers registered as instances, and real
//! clients over TCP, TLS and HTTP/2.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zeitwork_client::Client;
use zeitwork_control_plane::{Operator, OperatorConfig};
use zeitwork_edge::{EdgeConfig, EdgeProxy};

/// An upstream that answers with what it received, and echoes bytes after an upgrade.
async fn echo_server(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| async move {
                    if req.headers().get("upgrade").is_some() {
                        let up = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(u) = up.await {
                                let mut io = TokioIo::new(u);
                                let mut buf = [0u8; 1024];
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            }
                        });
                        let res = Response::builder()
                            .status(101)
                            .header("upgrade", "echo")
                            .header("connection", "upgrade")
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        return Ok::<_, Infallible>(res);
                    }
                    let headers: serde_json::Map<String, Value> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_str().unwrap_or("").to_owned())))
                        .collect();
                    let method = req.method().to_string();
                    let path = req.uri().to_string();
                    let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                    let out = json!({"server": name, "method": method, "path": path, "headers": headers, "body_len": body.len()});
                    Ok(Response::new(Full::new(Bytes::from(out.to_string()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

struct World {
    op: Option<Operator>,
    admin: Client,
    agent: Client,
    edge_token: String,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let op = Operator::start(OperatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_owned(),
        // The upstreams stand in for node agents and send no heartbeats.
        node_timeout_secs: 3600,
        // No DNS server answers here: domain checks fail without leaving this host.
        dns_resolver: Some("127.0.0.1:9".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = Client::new(&format!("http://{}", op.addr()), op.admin_token.clone());
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"}))
        .await
        .unwrap();
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "acme"})).await.unwrap();
    admin.post::<_, Value>("/api/v1/projects", &json!({"name": "web", "org": "acme"})).await.unwrap();
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
    let agent = Client::new(&format!("http://{}", op.addr()), Some(token("node-agent").await));
    let edge_token = token("edge-proxy").await;
    World { op: Some(op), admin, agent, edge_token, _dir: dir }
}

impl World {
    fn op(&self) -> &Operator {
        self.op.as_ref().unwrap()
    }

    /// A deployment whose instances are the given upstreams (each registered as a node).
    async fn deploy(&self, upstreams: &[SocketAddr]) -> String {
        let d: Value = self
            .admin
            .post("/api/v1/deployments", &json!({"org": "acme", "project": "web", "image": "example/web:1"}))
            .await
            .unwrap();
        let id = d["id"].as_str().unwrap().to_owned();
        for up in upstreams {
            let node: Value = self
                .agent
                .post(
                    "/api/v1/nodes",
                    &json!({"hostname": format!("node-{}", up.port()), "region": "local", "address": format!("http://{up}"), "capacity": {"vcpu": 4, "memory": 4096}}),
                )
                .await
                .unwrap();
            let inst = self
                .op()
                .store
                .create_instance(&zeitwork_store::NewInstance {
                    deployment: id.clone(),
                    node: Some(node["id"].as_str().unwrap().to_owned()),
                    region: "local".into(),
                    resources: zeitwork_api_types::Resources { vcpu: 1, memory: 256 },
                    runtime: Some("container".into()),
                })
                .await
                .unwrap();
            // The node reports with its own credential, as its agent would.
            let own = node["credential"].as_str().expect("a registration returns the node's credential");
            let _: Value = Client::new(&format!("http://{}", self.op().addr()), Some(own.to_owned()))
                .put(
                    &format!("/api/v1/instances/{}/status", inst.id),
                    &json!({"status": "ready", "address": "10.0.0.2:8080"}),
                )
                .await
                .unwrap_or(Value::Null);
        }
        id
    }

    async fn edge(&self, f: impl FnOnce(&mut EdgeConfig)) -> EdgeProxy {
        let mut c = EdgeConfig {
            http_listen: "127.0.0.1:0".parse().unwrap(),
            https_listen: "127.0.0.1:0".parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            operator_url: format!("http://{}", self.op().addr()),
            token: Some(self.edge_token.clone()),
            ..Default::default()
        };
        f(&mut c);
        EdgeProxy::start(c).await.unwrap()
    }
}

async fn wait_for_host(edge: &EdgeProxy, host: &str) {
    for _ in 0..300 {
        if edge.state.routes.read().unwrap().hosts.contains_key(host) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the edge never learnt {host}");
}

async fn get(edge: &EdgeProxy, host: &str, path: &str) -> (u16, String, reqwest::header::HeaderMap) {
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("http://{}{path}", edge.http_addr()))
        .header("host", host)
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (status, res.text().await.unwrap(), headers)
}

/// Writes raw bytes and returns what the edge answered (up to close or 2 s).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routes_by_host_with_forwarding_headers_and_404s() {
    let w = world().await;
    let up = echo_server("a").await;
    let edge = w.edge(|_| {}).await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;

    let (status, body, headers) = get(&edge, &format!("{host}:8083"), "/hello?x=1").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["path"], "/hello?x=1");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");
    assert_eq!(v["headers"]["x-forwarded-proto"], "http");
    assert_eq!(v["headers"]["x-forwarded-host"], host);
    assert!(v["headers"]["x-zeitwork-instance"].as_str().unwrap().starts_with("ins_"));
    let rid = headers.get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(v["headers"]["x-request-id"], rid);

    // A client cannot pose as the platform or forge its address.
    let res = reqwest::Client::new()
        .get(format!("http://{}/", edge.http_addr()))
        .header("host", &host)
        .header("x-zeitwork-instance", "ins_forged")
        .header("x-forwarded-for", "1.2.3.4")
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    assert_ne!(v["headers"]["x-zeitwork-instance"], "ins_forged");
    assert_eq!(v["headers"]["x-forwarded-for"], "127.0.0.1");

    // Unknown hosts get Zeitwork's own 404 page.
    let (status, body, _) = get(&edge, "nobody.zeitwork.localhost", "/").await;
    assert_eq!(status, 404);
    assert!(body.contains("Zeitwork") && !body.contains("server"), "{body}");

    // The project host follows the active deployment.
    w.op()
        .store
        .activate_deployment(&dep, &zeitwork_store::Audit::new("test", "deployment.activate", &dep))
        .await
        .unwrap();
    wait_for_host(&edge, "web-acme.zeitwork.localhost").await;
    assert_eq!(get(&edge, "web-acme.zeitwork.localhost", "/").await.0, 200);

    // Streaming request bodies arrive whole.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..80).map(|_| Ok(vec![b'x'; 64 * 1024])).collect();
    let res = reqwest::Client::new()
        .post(format!("http://{}/upload", edge.http_addr()))
        .header("host", &host)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["body_len"], 80 * 64 * 1024);

    // Metrics count requests by host and status.
    let m = reqwest::get(format!("http://{}/metrics", edge.admin_addr())).await.unwrap().text().await.unwrap();
    // Exact names at the start of a line: one prefix, not two.
    let line = |start: &str| m.lines().any(|l| l.starts_with(start));
    assert!(line(&format!("zeitwork_edge_requests_total{{host=\"{host}\",status=\"200\"}}")), "{m}");
    assert!(line("zeitwork_edge_requests_total{host=\"unrouted\",status=\"404\"} 1"), "{m}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_refused_connections_and_keeps_serving_without_operator() {
    let mut w = world().await;
    let good = echo_server("good").await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let edge = w.edge(|c| c.metrics_token = Some("edge-scrape-token".into())).await;
    let dep = w.deploy(&[good, dead]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    for _ in 0..20 {
        let (status, body, _) = get(&edge, &host, "/").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"good\""));
    }
    // With a metrics token set, a scrape must present it.
    let scrape = format!("http://{}/metrics", edge.admin_addr());
    let http = reqwest::Client::new();
    assert_eq!(http.get(&scrape).send().await.unwrap().status(), 401);
    assert_eq!(http.get(&scrape).bearer_auth("edge-scrape").send().await.unwrap().status(), 403);
    let m = http.get(&scrape).bearer_auth("edge-scrape-token").send().await.unwrap().text().await.unwrap();
    assert!(!m.contains("zeitwork_edge_retries_total 0"), "the dead instance was tried and skipped: {m}");

    // The operator goes away; the last table keeps serving.
    w.op.take().unwrap().shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&edge, &host, "/").await.0, 200);
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_per_client_behind_a_trusted_load_balancer() {
    let w = world().await;
    let up = echo_server("a").await;
    w.admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"rate_limit": {"requests_per_second": 1, "burst": 3}}))
        .await
        .unwrap();
    let edge = w.edge(|c| c.trusted_proxies = vec!["127.0.0.1".into()]).await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;

    let dst = edge.http_addr();
    let via_lb = |src: &str| {
        let mut bytes = zeitwork_net::encode_v2(src.parse().unwrap(), dst);
        bytes.extend_from_slice(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes());
        bytes
    };
    let mut codes = Vec::new();
    for _ in 0..5 {
        let out = raw(edge.http_addr(), &via_lb("127.0.0.7:4000")).await;
        codes.push(out.split(' ').nth(1).unwrap_or("").to_owned());
        if out.contains(" 200 ") {
            assert!(
                out.contains("\"x-forwarded-for\":\"127.0.0.7\""),
                "the PROXY header's source is the client: {out}"
            );
        }
        if out.contains(" 429 ") {
            assert!(out.to_ascii_lowercase().contains("retry-after: 1"), "{out}");
        }
    }
    assert_eq!(codes, ["200", "200", "200", "429", "429"]);
    // Another client behind the same load balancer has its own bucket.
    assert!(raw(edge.http_addr(), &via_lb("127.0.0.8:4000")).await.contains(" 200 "));
    edge.shutdown().await;

    // From a peer that is not a trusted load balancer a PROXY header is just bad HTTP.
    let edge = w.edge(|_| {}).await;
    wait_for_host(&edge, &host).await;
    let out = raw(edge.http_addr(), &via_lb("10.9.9.9:1")).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ambiguous_requests_never_reach_an_instance() {
    let w = world().await;
    let up = echo_server("a").await;
    let edge = w.edge(|c| c.header_read_timeout_secs = 1).await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    let a = edge.http_addr();
    let status = |s: &str| s.split(' ').nth(1).unwrap_or("closed").to_owned();

    let cases: Vec<(&str, String)> = vec![
        ("CL + TE", format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n")),
        ("two Content-Lengths", format!("POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde")),
        ("bad chunk size", format!("POST / HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")),
        ("obs-fold", format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-A: 1\r\n  folded\r\n\r\n")),
        ("two Hosts", format!("GET / HTTP/1.1\r\nHost: {host}\r\nHost: other.zeitwork.localhost\r\n\r\n")),
        ("authority vs Host", format!("GET http://other.zeitwork.localhost/ HTTP/1.1\r\nHost: {host}\r\n\r\n")),
        ("huge header", format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {}\r\n\r\n", "a".repeat(100_000))),
    ];
    for (name, req) in cases {
        let out = raw(a, req.as_bytes()).await;
        let code = status(&out);
        assert!(!out.contains("/smuggled"), "{name}: the smuggled request reached the app: {out}");
        if code == "200" {
            // CL+TE may be answered as one chunked request (TE wins, CL dropped); the
            // second request must then be a request of its own, not body bytes.
            assert_eq!(name, "CL + TE", "{name}: {out}");
            assert!(out.contains("\"body_len\":0"), "{name}: {out}");
        } else {
            assert!(["400", "431", "closed"].contains(&code.as_str()) || out.is_empty(), "{name}: {out}");
        }
    }

    // A slow client is cut off by the header read timeout, while others are served.
    let mut slow = TcpStream::connect(a).await.unwrap();
    slow.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\n").as_bytes()).await.unwrap();
    assert_eq!(get(&edge, &host, "/").await.0, 200);
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "a slowloris connection must be closed");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_style_upgrades_are_spliced() {
    let w = world().await;
    let up = echo_server("a").await;
    let edge = w.edge(|_| {}).await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    let mut s = TcpStream::connect(edge.http_addr()).await.unwrap();
    s.write_all(format!("GET /ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping over the tunnel").await.unwrap();
    let mut back = [0u8; 20];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping over the tunnel");
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_sni_http2_and_no_foreign_certificates() {
    let w = world().await;
    let up = echo_server("a").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["*.zeitwork.localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ca.cert.pem()).unwrap();
    std::fs::write(&key, ca.signing_key.serialize_pem()).unwrap();
    let edge = w
        .edge(|c| {
            c.tls_cert = Some(cert.clone());
            c.tls_key = Some(key.clone());
        })
        .await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    let https = edge.https_addr().unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).unwrap())
        .resolve(&host, https)
        .resolve("other.example.com", https)
        .build()
        .unwrap();
    let res = client.get(format!("https://{host}:{}/tls", https.port())).send().await.unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    let v: Value = res.json().await.unwrap();
    assert_eq!(v["headers"]["x-forwarded-proto"], "https");
    // A name with no certificate gets none: the handshake fails.
    assert!(client.get(format!("https://other.example.com:{}/", https.port())).send().await.is_err());
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn through_the_load_balancer_each_client_address_has_its_own_limit() {
    let w = world().await;
    let up = echo_server("a").await;
    w.admin
        .patch::<_, Value>("/api/v1/projects/acme/web", &json!({"rate_limit": {"requests_per_second": 1, "burst": 2}}))
        .await
        .unwrap();
    let edge = w.edge(|c| c.trusted_proxies = vec!["127.0.0.1/32".into()]).await;
    // The load balancer learns the edge from the operator (the edge announces itself).
    let t: Value = w
        .admin
        .post("/api/v1/tokens", &json!({"name": "lb", "scope": {"kind": "cluster", "role": "load-balancer"}}))
        .await
        .unwrap();
    let lb = zeitwork_lb::LoadBalancer::start(zeitwork_lb::LbConfig {
        listeners: vec![zeitwork_lb::ListenerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            backends: Vec::new(),
            backends_from: Some(zeitwork_lb::EdgePort::Http),
            algorithm: zeitwork_lb::Algorithm::RoundRobin,
            proxy_protocol: true,
        }],
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        operator_url: Some(w.admin.base().to_owned()),
        token: Some(t["secret"].as_str().unwrap().to_owned()),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !lb.pools[0].backends().iter().any(|b| b.addr == edge.http_addr()) {
        assert!(std::time::Instant::now() < deadline, "the load balancer never learned the edge");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let edges: Vec<Value> = w.admin.get("/api/v1/edges").await.unwrap();
    assert_eq!(edges[0]["http_address"], edge.http_addr().to_string());
    let denied = w.agent.get::<Value>("/api/v1/edges").await.unwrap_err();
    assert_eq!(denied.status(), Some(403), "node agents do not list edges");
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    let from = |src: &'static str| {
        let host = host.clone();
        let lb_addr = lb.addrs()[0];
        async move {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
            let mut s = sock.connect(lb_addr).await.unwrap();
            s.write_all(format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
            out
        }
    };
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(from("127.0.0.2").await);
    }
    assert!(a[0].contains(" 200 ") && a[0].contains("\"x-forwarded-for\":\"127.0.0.2\""), "{}", a[0]);
    assert!(a[1].contains(" 200 "));
    assert!(a[2].starts_with("HTTP/1.1 429"), "{}", a[2]);
    let b = from("127.0.0.3").await;
    assert!(b.contains(" 200 ") && b.contains("\"x-forwarded-for\":\"127.0.0.3\""), "{b}");
    lb.shutdown().await;
    edge.shutdown().await;
}

/// The certificate issuance path against the real `pebble` ACME CA.
async fn acme_issues(challenge: zeitwork_edge::acme::Challenge) {
    assert!(
        zeitwork_testkit::Pebble::available(),
        "pebble and pebble-challtestsrv are needed (apt-get install pebble; .ci/run installs it)"
    );
    let w = world().await;
    let up = echo_server("a").await;
    // Pebble must know the edge's ports before the edge binds them: a port found
    // free may be taken by a test running alongside, so try again with others.
    let mut attempt = 0;
    let (pebble, edge, tp) = loop {
        attempt += 1;
        let (hp, tp) = (zeitwork_testkit::free_port(), zeitwork_testkit::free_port());
        let pebble = zeitwork_testkit::Pebble::start(hp, tp).unwrap();
        let c = EdgeConfig {
            http_listen: format!("127.0.0.1:{hp}").parse().unwrap(),
            https_listen: format!("127.0.0.1:{tp}").parse().unwrap(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            operator_url: format!("http://{}", w.op().addr()),
            token: Some(w.edge_token.clone()),
            acme_directory: Some(pebble.directory_url.clone()),
            acme_ca_root: Some(pebble.api_root.clone()),
            acme_challenge: challenge,
            ..Default::default()
        };
        match EdgeProxy::start(c).await {
            Ok(edge) => break (pebble, edge, tp),
            Err(e) if attempt < 5 && e.to_string().contains("in use") => drop(pebble),
            Err(e) => panic!("the edge did not start: {e:?}"),
        }
    };
    let dep = w.deploy(&[up]).await;
    w.op()
        .store
        .activate_deployment(&dep, &zeitwork_store::Audit::new("test", "deployment.activate", &dep))
        .await
        .unwrap();
    for name in ["www.acme.test", "unverified.acme.test"] {
        w.admin.post::<_, Value>("/api/v1/projects/acme/web/domains", &json!({"name": name})).await.unwrap();
    }
    // Not verified yet: a developer cannot force it, and DNS does not point here.
    let dev: Value = w
        .admin
        .post("/api/v1/tokens", &json!({"name": "dev", "scope": {"kind": "org", "org": "acme", "role": "developer"}}))
        .await
        .unwrap();
    let dev = Client::new(w.admin.base(), Some(dev["secret"].as_str().unwrap().to_owned()));
    let forced =
        dev.post::<_, Value>("/api/v1/projects/acme/web/domains/www.acme.test/verify", &json!({"force": true})).await;
    assert_eq!(forced.unwrap_err().status(), Some(403));
    let dns = dev.post::<_, Value>("/api/v1/projects/acme/web/domains/www.acme.test/verify", &json!({})).await;
    assert_eq!(dns.unwrap_err().status(), Some(409));
    let v: Value =
        w.admin.post("/api/v1/projects/acme/web/domains/www.acme.test/verify", &json!({"force": true})).await.unwrap();
    assert_eq!(v["verified"], true);

    let mut issued = false;
    for _ in 0..300 {
        if edge.state.certs.has("www.acme.test") {
            issued = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recorded = w.op().store.get_certificate("www.acme.test").await.unwrap().and_then(|c| c.error);
    assert!(
        issued,
        "no certificate within 30 s ({recorded:?}); pebble said:\n{}",
        pebble.log().lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    assert!(!edge.state.certs.has("unverified.acme.test"), "only verified domains get certificates");

    // A client that trusts pebble's root gets the app over HTTPS.
    let api = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&pebble.api_root).unwrap()).unwrap())
        .build()
        .unwrap();
    let root = api.get(format!("{}/roots/0", pebble.management_url)).send().await.unwrap().text().await.unwrap();
    let https = edge.https_addr().unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(root.as_bytes()).unwrap())
        .resolve("www.acme.test", https)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let res = client.get(format!("https://www.acme.test:{tp}/hello")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    // Plain HTTP now redirects to HTTPS, except for ACME challenges.
    let (status, _, headers) = get(&edge, "www.acme.test", "/page?q=1").await;
    assert_eq!(status, 308);
    assert_eq!(headers.get("location").unwrap(), "https://www.acme.test/page?q=1");
    let domains: Vec<Value> = w.admin.get("/api/v1/projects/acme/web/domains").await.unwrap();
    let state = |n: &str| domains.iter().find(|d| d["name"] == n).unwrap()["certificate"].clone();
    assert_eq!((state("www.acme.test"), state("unverified.acme.test")), (json!("issued"), json!("none")));
    // The issuance is an event of the domain's project (and so reaches its notification channels).
    let events: Vec<Value> = w.admin.get("/api/v1/events?org=acme&action=certificate.issue").await.unwrap();
    assert!(events.iter().any(|e| e["target"] == "www.acme.test" && e["project"] == "web"), "{events:?}");

    // Another edge serves the same certificate from the store without issuing.
    let other = w.edge(|_| {}).await;
    let mut loaded = false;
    for _ in 0..100 {
        if other.state.certs.has("www.acme.test") {
            loaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(loaded, "the second edge did not load the certificate");
    let m = reqwest::get(format!("http://{}/metrics", other.admin_addr())).await.unwrap().text().await.unwrap();
    assert!(m.contains("zeitwork_edge_certificate_expiry_timestamp_seconds{host=\"www.acme.test\"}"), "{m}");
    other.shutdown().await;
    edge.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acme_http_01_with_pebble() {
    acme_issues(zeitwork_edge::acme::Challenge::Http01).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acme_tls_alpn_01_with_pebble() {
    acme_issues(zeitwork_edge::acme::Challenge::TlsAlpn01).await;
}

/// An upstream written byte by byte, to give the edge every response framing
/// (and some broken ones). Answers by path; `connections` counts accepts.
async fn scripted_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let connections = std::sync::Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    // One request head (the edge sends bodies with a length; these tests send none).
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end);
                    let mut line = head.split(' ');
                    let (method, path) = (line.next().unwrap_or(""), line.next().unwrap_or(""));
                    let reply: &[u8] = match path {
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n",
                        "/until-close" => b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close",
                        "/bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXXzz\r\n",
                        "/two-lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
                        "/then-close" => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbye!",
                        _ if method == "HEAD" => b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok",
                    };
                    if s.write_all(reply).await.is_err() {
                        return;
                    }
                    // These end the connection without announcing it.
                    if ["/until-close", "/bad-chunk", "/two-lengths", "/then-close"].contains(&path) {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plain_http_relays_every_response_framing_and_reuses_only_clean_connections() {
    let w = world().await;
    let (up, connections) = scripted_server().await;
    let edge = w.edge(|c| c.workers = 1).await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;

    // Chunked: passed through whole (extensions and trailers included) and decodable.
    let (status, body, h) = get(&edge, &host, "/chunked").await;
    assert_eq!((status, body.as_str()), (200, "hello world"));
    assert!(h.get("x-request-id").is_some());
    // Until close: the client is told the connection closes after it.
    let (status, body, h) = get(&edge, &host, "/until-close").await;
    assert_eq!(
        (status, body.as_str(), h.get("connection").map(|v| v.to_str().unwrap())),
        (200, "until close", Some("close"))
    );
    // HEAD: the length is kept, no body is waited for.
    let res = reqwest::Client::new()
        .head(format!("http://{}/x", edge.http_addr()))
        .header("host", &host)
        .send()
        .await
        .unwrap();
    assert_eq!((res.status().as_u16(), res.headers()["content-length"].to_str().unwrap()), (200, "11"));
    // Zeitwork's own pages answer HEAD without a body too: the next response on
    // the connection starts where it should.
    let two = "HEAD / HTTP/1.1\r\nHost: nowhere.example\r\n\r\nGET / HTTP/1.1\r\nHost: nowhere.example\r\nConnection: close\r\n\r\n";
    let out = raw(edge.http_addr(), two.as_bytes()).await;
    let second = out.find("HTTP/1.1 404").and_then(|i| out[i + 1..].find("HTTP/1.1 404").map(|j| i + 1 + j));
    let second = second.unwrap_or_else(|| panic!("two 404 answers expected: {out}"));
    assert!(!out[..second].contains("<html"), "the HEAD answer has no body: {out}");

    // Keep-alive and pipelining: two requests in one write, answered in order on one connection.
    let before = connections.load(std::sync::atomic::Ordering::SeqCst);
    let two =
        format!("GET /a HTTP/1.1\r\nHost: {host}\r\n\r\nGET /b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let out = raw(edge.http_addr(), two.as_bytes()).await;
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains("x-app: 1") || out.contains("X-App: 1"), "{out}");
    assert!(out.trim_end().ends_with("ok"), "{out}");
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "kept upstream connections serve the next requests"
    );

    // A kept connection the app closed after answering: the next request goes out
    // on a fresh one, the client sees nothing of it.
    assert_eq!(get(&edge, &host, "/then-close").await.0, 200);
    for _ in 0..3 {
        assert_eq!(get(&edge, &host, "/again").await.0, 200);
    }

    // Broken framing from the app: 502 before anything was sent, a cut
    // connection after; either way the connection is not reused.
    let out = raw(edge.http_addr(), format!("GET /two-lengths HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    let out = raw(edge.http_addr(), format!("GET /bad-chunk HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await;
    let cut = out.starts_with("HTTP/1.1 200") && !out.contains("XXzz");
    assert!(out.starts_with("HTTP/1.1 502") || cut, "the bad chunk is not passed on: {out}");
    assert_eq!(get(&edge, &host, "/after").await.0, 200, "the edge serves on after broken responses");

    // A body that is not small goes the general way and still arrives whole.
    let big = vec![b'x'; 200_000];
    let res = reqwest::Client::new()
        .post(format!("http://{}/big", edge.http_addr()))
        .header("host", &host)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 200);
    edge.shutdown().await;
}

/// HTTP/1.1 over TLS (ALPN `http/1.1`, or none) takes the lean path like the
/// plain port: the instance's header names arrive as it wrote them (hyper
/// would lower-case them), pipelined requests share one kept upstream
/// connection, and a response framed by the connection's close ends with a
/// clean TLS close; HTTP/2 on the same port stays on hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_http1_takes_the_lean_path() {
    let w = world().await;
    let (up, connections) = scripted_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = rcgen::generate_simple_self_signed(vec!["*.zeitwork.localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ca.cert.pem()).unwrap();
    std::fs::write(&key, ca.signing_key.serialize_pem()).unwrap();
    let edge = w
        .edge(|c| {
            c.workers = 1;
            c.tls_cert = Some(cert.clone());
            c.tls_key = Some(key.clone());
        })
        .await;
    let dep = w.deploy(&[up]).await;
    let host = format!("{dep}.zeitwork.localhost");
    wait_for_host(&edge, &host).await;
    let https = edge.https_addr().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    // Everything the edge says on one TLS connection (ALPN `alpn`) to `bytes`,
    // and whether it ended with close_notify.
    let tls_raw = |alpn: Vec<Vec<u8>>, bytes: String| {
        let (roots, host) = (roots.clone(), host.clone());
        async move {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn;
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
            let tcp = TcpStream::connect(https).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from(host).unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(bytes.as_bytes()).await.unwrap();
            let mut out = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
            (String::from_utf8_lossy(&out).into_owned(), matches!(read, Ok(Ok(_))))
        }
    };
    let before = connections.load(std::sync::atomic::Ordering::SeqCst);
    let two =
        format!("GET /a HTTP/1.1\r\nHost: {host}\r\n\r\nGET /b HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    for alpn in [vec![b"http/1.1".to_vec()], vec![]] {
        let (out, clean) = tls_raw(alpn.clone(), two.clone()).await;
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "ALPN {alpn:?}: {out}");
        assert!(out.contains("\r\nX-App: 1\r\n"), "the lean path passes header names as written: {out}");
        assert!(out.contains("x-request-id"), "{out}");
        assert!(clean, "the connection ends with close_notify");
    }
    assert!(
        connections.load(std::sync::atomic::Ordering::SeqCst) <= before + 1,
        "kept upstream connections serve the next requests"
    );
    // Chunked and until-close responses arrive whole, the latter with a clean close.
    let (out, _) = tls_raw(
        vec![b"http/1.1".to_vec()],
        format!("GET /chunked HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(out.contains("5\r\nhello\r\n") && out.ends_with("0\r\nx-trailer: 1\r\n\r\n"), "{out}");
    let (out, clean) =
        tls_raw(vec![b"http/1.1".to_vec()], format!("GET /until-close HTTP/1.1\r\nHost: {host}\r\n\r\n")).await;
    assert!(out.ends_with("until close") && clean, "{out}");
    // A request the lean path does not take still gets its answer over TLS.
    let (out, _) = tls_raw(vec![b"http/1.1".to_vec()], format!("GET /x HTTP/1.0\r\nHost: {host}\r\n\r\n")).await;
    assert!(out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"), "{out}");
    // reqwest over HTTP/1.1 and over HTTP/2.
    let client = |h1: bool| {
        let b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).unwrap())
            .resolve(&host, https);
        let b = if h1 { b.http1_only() } else { b };
        b.build().unwrap()
    };
    let url = format!("https://{host}:{}/ok", https.port());
    let res = client(true).get(&url).send().await.unwrap();
    assert_eq!((res.version(), res.status().as_u16()), (reqwest::Version::HTTP_11, 200));
    assert_eq!(res.text().await.unwrap(), "ok");
    let res = client(false).get(&url).send().await.unwrap();
    assert_eq!((res.version(), res.status().as_u16()), (reqwest::Version::HTTP_2, 200));
    assert_eq!(res.text().await.unwrap(), "ok");
    edge.shutdown().await;
}
