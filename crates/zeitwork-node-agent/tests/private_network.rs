//! Private project networks on one node, with real parts: an operator on
//! SQLite, a registry, runc instances behind the nftables firewall and the
//! node's resolver. Two instances of one project find each other by name
//! and talk over their private addresses; an instance of another org's
//! project can neither resolve nor reach them; an egress allow-list limits
//! what a project reaches outside. Two agents on one host (two instance
//! ranges, two firewall tables, two tunnel devices) each keep their private
//! traffic, and an agent that stops takes its table and its tunnel with it.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::NodeAgent;

/// An image that serves its own instance id at `/id.txt` and three CGI
/// probes: `ns?NAME` and `srv?NAME` ask the node's resolver, `get?HOST:PORT`
/// fetches that host's `/id.txt` with `nc` (or says `unreachable`).
const PROBE: &str = r#"mkdir -p /tmp/www/cgi-bin; /bin/busybox hostname > /tmp/www/id.txt
/bin/busybox cat > /tmp/www/cgi-bin/ns <<'X'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
/bin/busybox nslookup $QUERY_STRING 2>&1
X
/bin/busybox cat > /tmp/www/cgi-bin/srv <<'X'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
/bin/busybox nslookup -type=SRV $QUERY_STRING 2>&1
X
/bin/busybox cat > /tmp/www/cgi-bin/get <<'X'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
R=$(printf 'GET /id.txt HTTP/1.0\r\n\r\n' | /bin/busybox nc -w 3 ${QUERY_STRING%:*} ${QUERY_STRING##*:} | /bin/busybox tail -n 1)
if [ -n "$R" ]; then echo "$R"; else echo unreachable; fi
X
/bin/busybox chmod +x /tmp/www/cgi-bin/ns /tmp/www/cgi-bin/srv /tmp/www/cgi-bin/get
exec /bin/busybox httpd -f -p $PORT -h /tmp/www"#;

/// Ready instances of `dep` once there are `n`: (id, link address).
async fn ready_instances(admin: &Client, dep: &str, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        let ready: Vec<_> = is
            .iter()
            .filter(|i| i["status"] == "ready")
            .map(|i| (i["id"].as_str().unwrap().to_owned(), i["address"].as_str().unwrap().to_owned()))
            .collect();
        if ready.len() == n {
            return ready;
        }
        assert!(Instant::now() < deadline, "{dep} never had {n} ready instances: {is:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs probe `cgi` with `arg` inside the instance at `addr`.
async fn probe(addr: &str, cgi: &str, arg: &str) -> String {
    let url = format!("http://{addr}/cgi-bin/{cgi}?{arg}");
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
    http.get(&url).send().await.unwrap().text().await.unwrap()
}

/// The node's firewall as it stands, for failure messages.
fn ruleset() -> String {
    let out = std::process::Command::new("nft").args(["list", "ruleset"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// The instance at `from` fetches `target`'s id and gets `want` (the agent
/// applies a new member a moment after the operator lists it).
async fn reaches(from: &str, target: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = probe(from, "get", target).await;
        if got.trim() == want {
            return;
        }
        assert!(Instant::now() < deadline, "{from} never reached {target}: {got}\nfirewall:\n{}", ruleset());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The addresses an `nslookup` answer lists (the server's own line has a port, so it is left out).
fn addresses(nslookup: &str) -> Vec<Ipv4Addr> {
    nslookup.lines().filter_map(|l| l.strip_prefix("Address:")).filter_map(|a| a.trim().parse().ok()).collect()
}

/// A network namespace standing for the internet: 198.51.100.2 serves its
/// name at `/id.txt` on ports 80 and 81, reached through a veth pair from the host.
struct Outside {
    ns: String,
    servers: Vec<std::process::Child>,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn start() -> Outside {
        let ns = format!("pnout{}", std::process::id() % 100_000);
        let (host_if, peer) = (format!("{ns}h"), format!("{ns}p"));
        let ip = |args: &[&str]| {
            let out = std::process::Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
        let _ = std::process::Command::new("ip").args(["link", "del", &host_if]).output();
        ip(&["netns", "add", &ns]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns]);
        ip(&["-n", &ns, "addr", "add", "198.51.100.2/24", "dev", &peer]);
        ip(&["-n", &ns, "link", "set", &peer, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", "198.51.100.1"]);
        ip(&["addr", "add", "198.51.100.1/24", "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("id.txt"), "outside\n").unwrap();
        let servers = ["80", "81"]
            .iter()
            .map(|port| {
                std::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "busybox", "httpd", "-f", "-p", port, "-h"])
                    .arg(dir.path())
                    .spawn()
                    .unwrap()
            })
            .collect();
        Outside { ns, servers, _dir: dir }
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::process::Command::new("ip").args(["link", "del", &format!("{}h", self.ns)]).output();
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Set in the copy of this test that runs inside its own network namespace.
const INSIDE: &str = "ZEITWORK_TEST_OWN_NETNS";

/// Runs `test` of this binary again inside a network namespace of its own, so
/// the firewall tables, routes and forwarding it sets up are its own and not
/// those of other tests on the host (every Zeitwork table fences every
/// instance interface); the operator, registry and agent all live in it.
fn run_in_own_netns(test: &str) {
    // One namespace per test: the tests of this binary run side by side.
    let tag: String = test.split('_').filter_map(|w| w.chars().next()).take(6).collect();
    let ns = format!("zwpn{tag}{}", std::process::id() % 100_000);
    let sh = |script: &str| {
        let out = std::process::Command::new("sh").args(["-c", script]).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
    sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
    sh(&format!("nsenter --net=/run/netns/{ns} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"));
    // nsenter, not `ip netns exec`: that one mounts a new /sys, hiding the cgroups runc needs.
    let status = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads", "1"])
        .env(INSIDE, "1")
        .status()
        .unwrap();
    let _ = std::process::Command::new("ip").args(["netns", "del", &ns]).output();
    assert!(status.success(), "{test} failed inside its network namespace (output above)");
}

#[test]
fn instances_of_a_project_find_and_reach_each_other_and_no_one_else() {
    if std::env::var_os(INSIDE).is_none() {
        return run_in_own_netns("instances_of_a_project_find_and_reach_each_other_and_no_one_else");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(private_network());
}

async fn private_network() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/probe", "v1", PROBE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let config = OperatorConfig { private_network: "100.100.0.0/16".into(), ..Default::default() };
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();
    admin
        .post::<_, Value>(
            "/api/v1/projects",
            &json!({"name": "spy", "org": "other", "port": 8080, "resources": {"vcpu": 1, "memory": 128}}),
        )
        .await
        .unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    let mut config = common::agent_config(&base, token, dir.path(), "agent-privnet", "10.248.0.0");
    config.dns_port = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    // No resolver upstream: names outside the private networks are refused (no internet here).
    config.dns_upstreams = Some(Vec::new());
    // Host names of allow-lists are asked of a DNS server on loopback.
    let dns_port = zeitwork_testkit::free_udp_port();
    let names = |ip: [u8; 4]| vec![zeitwork_testkit::DnsRecord::A("api.outside.test".into(), ip.into())];
    let dns = zeitwork_testkit::Dnsmasq::start_on(dns_port, &names([198, 51, 100, 2])).unwrap();
    config.dns_resolver = Some(dns.addr());
    let agent = NodeAgent::start(config).await.unwrap();
    let outside = Outside::start();

    let deploy = |org: &str, project: &str, n: u32| {
        let (admin, image) = (admin.clone(), image.clone());
        let body = json!({"org": org, "project": project, "image": image, "instances_per_region": n});
        async move {
            let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
            d["id"].as_str().unwrap().to_owned()
        }
    };
    let web_dep = deploy("acme", "web", 2).await;
    let spy_dep = deploy("other", "spy", 1).await;
    let web = ready_instances(&admin, &web_dep, 2).await;
    let spy = ready_instances(&admin, &spy_dep, 1).await;
    let ((a_id, a), (b_id, b), (_, s)) = (&web[0], &web[1], &spy[0]);

    // Both web instances are listed under the project's name, on its private /24.
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let answer = probe(a, "ns", "web.internal").await;
        let listed = addresses(&answer);
        if listed.len() == 2 {
            break listed;
        }
        assert!(Instant::now() < deadline, "web.internal never listed both: {answer}\nfirewall:\n{}", ruleset());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let net = |ip: &Ipv4Addr| <[u8; 3]>::try_from(&ip.octets()[..3]).unwrap();
    assert!(listed.iter().all(|ip| net(ip)[..2] == [100, 100] && net(ip) == net(&listed[0])), "{listed:?}");
    // Each instance by name, from the other; and they reach each other there.
    let b_private = addresses(&probe(a, "ns", &format!("{b_id}.web.internal")).await);
    let a_private = addresses(&probe(b, "ns", &format!("{a_id}.web.internal")).await);
    assert_eq!((a_private.len(), b_private.len()), (1, 1), "each instance resolves the other");
    reaches(a, &format!("{}:8080", b_private[0]), b_id).await;
    reaches(b, &format!("{}:8080", a_private[0]), a_id).await;
    // SRV with the port.
    let srv = probe(a, "srv", "_http._tcp.web.internal").await;
    assert!(srv.contains("8080") && srv.contains(".web.internal"), "{srv}");

    // Another org's instance: no name resolves, no address answers.
    let seen = probe(s, "ns", "web.internal").await;
    assert!(addresses(&seen).is_empty(), "the spy resolved web.internal: {seen}");
    assert!(addresses(&probe(s, "ns", &format!("{a_id}.web.internal")).await).is_empty());
    for target in [a_private[0].to_string(), b_private[0].to_string()] {
        assert_eq!(probe(s, "get", &format!("{target}:8080")).await.trim(), "unreachable", "spy reached {target}");
    }
    let a_link = a.split(':').next().unwrap();
    assert_eq!(probe(s, "get", &format!("{a_link}:8080")).await.trim(), "unreachable", "spy reached {a_link}");
    // Nor does web reach the spy on its private address.
    let spy_private = addresses(&probe(s, "ns", "spy.internal").await);
    assert_eq!(spy_private.len(), 1, "the spy resolves its own project");
    assert_eq!(probe(a, "get", &format!("{}:8080", spy_private[0])).await.trim(), "unreachable");
    // Names outside the networks are refused here (no upstream resolver).
    assert!(addresses(&probe(a, "ns", "example.com").await).is_empty());

    // Without an allow-list the outside is reachable on both ports.
    assert_eq!(probe(a, "get", "198.51.100.2:80").await.trim(), "outside");
    assert_eq!(probe(a, "get", "198.51.100.2:81").await.trim(), "outside");
    // Bad allow-lists are refused with the field named.
    for bad in [
        json!({"allow": ["api.example.com:0"]}),
        json!({"allow": ["api.example.com:65536"]}),
        json!({"allow": ["not a host"]}),
        json!({"allow": ["198.51.100.2/24"]}),
        json!({"deny": []}),
    ] {
        let e = admin.patch::<_, Value>("/api/v1/projects/acme/web", &json!({"egress": bad})).await.unwrap_err();
        let e = e.to_string();
        assert!(e.contains("400") && e.contains("egress"), "{bad}: {e}");
    }
    let p: Value =
        admin.patch("/api/v1/projects/acme/web", &json!({"egress": {"allow": ["198.51.100.2:80"]}})).await.unwrap();
    assert_eq!(p["egress"]["allow"][0], "198.51.100.2:80");
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe(a, "get", "198.51.100.2:81").await.trim() != "unreachable" {
        assert!(Instant::now() < deadline, "the allow-list never took effect");
    }
    assert_eq!(probe(a, "get", "198.51.100.2:80").await.trim(), "outside");
    assert_eq!(probe(b, "get", "198.51.100.2:81").await.trim(), "unreachable");
    // The project network and the resolver stay open; other projects are not limited.
    reaches(a, &format!("{}:8080", b_private[0]), b_id).await;
    assert_eq!(addresses(&probe(a, "ns", "web.internal").await).len(), 2);
    assert_eq!(probe(s, "get", "198.51.100.2:81").await.trim(), "outside");
    // Lifted: the outside again.
    admin.patch::<_, Value>("/api/v1/projects/acme/web", &json!({"egress": null})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe(a, "get", "198.51.100.2:81").await.trim() != "outside" {
        assert!(Instant::now() < deadline, "lifting the allow-list never took effect");
    }

    // By host name: the agent resolves it and allows its address, on that port only.
    let p: Value =
        admin.patch("/api/v1/projects/acme/web", &json!({"egress": {"allow": ["api.outside.test:80"]}})).await.unwrap();
    assert_eq!(p["egress"]["allow"][0], "api.outside.test:80");
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe(a, "get", "198.51.100.2:80").await.trim() != "outside" {
        assert!(Instant::now() < deadline, "the name's address was never allowed\nfirewall:\n{}", ruleset());
    }
    assert_eq!(probe(a, "get", "198.51.100.2:81").await.trim(), "unreachable");
    // The name moves: its old address leaves the allow-list once the answer is
    // asked again (its TTL, at least 30 s).
    drop(dns);
    let deadline = Instant::now() + Duration::from_secs(10);
    let _dns = loop {
        match zeitwork_testkit::Dnsmasq::start_on(dns_port, &names([198, 51, 100, 3])) {
            Ok(d) => break d,
            // The previous one may hold the port a moment longer.
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while probe(a, "get", "198.51.100.2:80").await.trim() != "unreachable" {
        assert!(Instant::now() < deadline, "a stale address stayed allowed\nfirewall:\n{}", ruleset());
    }
    admin.patch::<_, Value>("/api/v1/projects/acme/web", &json!({"egress": null})).await.unwrap();

    agent.shutdown().await;
    drop(outside);
    drop(op);
}

/// The firewall tables of the host (its network namespace).
fn tables() -> String {
    let out = std::process::Command::new("nft").args(["list", "tables", "inet"]).output().unwrap();
    assert!(out.status.success(), "nft list tables: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_agents_on_one_host_keep_their_own_private_traffic() {
    if std::env::var_os(INSIDE).is_none() {
        return run_in_own_netns("two_agents_on_one_host_keep_their_own_private_traffic");
    }
    tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap().block_on(two_agents());
}

/// The two instances of `dep` find each other by name and reach each other
/// on their private addresses; answers the first one's link address and the
/// second one's private address.
async fn pair_talks(admin: &Client, dep: &str, project: &str) -> (String, String, String) {
    let pair = ready_instances(admin, dep, 2).await;
    let ((a_id, a), (b_id, b)) = (&pair[0], &pair[1]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (a_private, b_private) = loop {
        let a_private = addresses(&probe(b, "ns", &format!("{a_id}.{project}.internal")).await);
        let b_private = addresses(&probe(a, "ns", &format!("{b_id}.{project}.internal")).await);
        if let ([ap], [bp]) = (&a_private[..], &b_private[..]) {
            break (ap.to_string(), bp.to_string());
        }
        assert!(Instant::now() < deadline, "{project}'s instances never resolved each other\nfirewall:\n{}", ruleset());
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    reaches(a, &format!("{b_private}:8080"), b_id).await;
    reaches(b, &format!("{a_private}:8080"), a_id).await;
    (a.clone(), b_private, b_id.clone())
}

async fn two_agents() {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/probe", "v1", PROBE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resources = json!({"vcpu": 1, "memory": 128});
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": resources, "regions": ["local"]});
    let config = OperatorConfig { private_network: "100.100.0.0/16".into(), ..Default::default() };
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin.post::<_, Value>("/api/v1/regions", &json!({"code": "eu", "name": "EU", "country": "DE"})).await.unwrap();
    let api = json!({"name": "api", "org": "acme", "port": 8080, "resources": resources, "regions": ["eu"]});
    admin.post::<_, Value>("/api/v1/projects", &api).await.unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    // Two agents on this host, each with a range, a region, a resolver and a tunnel of its own.
    let start = |name: &str, region: &str, range: &str| {
        let mut config = common::agent_config(&base, token.clone(), &dir.path().join(name), name, range);
        config.region = region.into();
        config.dns_port = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
        config.dns_upstreams = Some(Vec::new());
        config.tunnel_port = zeitwork_testkit::free_udp_port();
        NodeAgent::start(config)
    };
    let one = start("agent-one", "local", "10.212.0.0").await.unwrap();
    let two = start("agent-two", "eu", "10.211.0.0").await.unwrap();
    let listed = tables();
    assert!(listed.contains("zeitwork_10_212") && listed.contains("zeitwork_10_211"), "{listed}");
    assert!(device_exists("zwg-10-212") && device_exists("zwg-10-211"), "each agent has a tunnel device");

    let deploy = |project: &str| {
        let (admin, image) = (admin.clone(), image.clone());
        let body = json!({"org": "acme", "project": project, "image": image, "instances_per_region": 2});
        async move {
            let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
            d["id"].as_str().unwrap().to_owned()
        }
    };
    let (web_dep, api_dep) = (deploy("web").await, deploy("api").await);
    // Each agent's table leaves the other's instances alone: both pairs talk.
    let (web_a, web_b_private, web_b_id) = pair_talks(&admin, &web_dep, "web").await;
    let (api_a, _, _) = pair_talks(&admin, &api_dep, "api").await;
    assert!(web_a.starts_with("10.212.") && api_a.starts_with("10.211."), "{web_a} {api_a}");
    // Still fenced from each other, across the ranges.
    let api_link = api_a.split(':').next().unwrap();
    assert_eq!(probe(&web_a, "get", &format!("{api_link}:8080")).await.trim(), "unreachable");

    // The second agent stops: its table and tunnel go, the first one's stay and work.
    two.shutdown().await;
    let listed = tables();
    assert!(!listed.contains("zeitwork_10_211") && listed.contains("zeitwork_10_212"), "{listed}");
    device_gone("zwg-10-211").await;
    assert!(device_exists("zwg-10-212"), "the first agent's tunnel went with the second agent");
    reaches(&web_a, &format!("{web_b_private}:8080"), &web_b_id).await;

    // A table a killed agent left behind goes in the next start's sweep, and
    // only the table of the sweeping agent's range.
    let out = std::process::Command::new("nft").args(["add", "table", "inet", "zeitwork_10_211"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let removed = zeitwork_runtime::sweep::sweep(&zeitwork_runtime::sweep::Scope {
        dirs: Vec::new(),
        base: "10.211.0.0".parse().unwrap(),
        // Every container the runtimes list keeps its cgroups.
        oci_runtimes: vec!["runc".into(), "crun".into()],
        known: Default::default(),
        grace: std::time::Duration::ZERO,
    })
    .await;
    assert!(removed.iter().any(|r| r.kind == "firewall" && r.name.contains("zeitwork_10_211")), "{removed:?}");
    let listed = tables();
    assert!(!listed.contains("zeitwork_10_211") && listed.contains("zeitwork_10_212"), "{listed}");

    one.shutdown().await;
    assert!(!tables().contains("zeitwork_"), "{}", tables());
    device_gone("zwg-10-212").await;
    drop(op);
}

/// Whether network device `name` exists.
fn device_exists(name: &str) -> bool {
    let out = std::process::Command::new("ip").args(["link", "show", "dev", name]).output().unwrap();
    out.status.success()
}

/// Waits until device `name` is gone: an agent's tunnel device goes with the
/// agent's last handle on it, a moment after it stops.
async fn device_gone(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while device_exists(name) {
        assert!(Instant::now() < deadline, "{name} outlived its agent");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
