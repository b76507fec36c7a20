//! Private project networks on one node, with real parts: an operator on
//! SQLite, a registry, runc instances behind the nftables firewall and the
//! node's resolver. Two instances of one project find each other by name
//! and talk over their private addresses; an instance of another org's
//! project can neither resolve nor reach them; an egress allow-list limits
//! what a project reaches outside. Two agents on one host (two instance
//! ranges, two firewall tables, two tunnel devices) each keep their private
//! traffic, and an agent that stops takes its table and its tunnel with it.
//! Two agents on two nodes (network namespaces of their own, one operator)
//! carry each project's network through their tunnel: an instance reaches its
//! project's instance on the other node by name, another project's reaches
//! neither. A container node and a QEMU microVM node on one host do the same
//! for a project with a container and a microVM, and the microVM reaches no
//! service of the host.

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use zeitwork_client::Client;
use zeitwork_control_plane::OperatorConfig;
use zeitwork_node_agent::NodeAgent;

/// An image that serves its own instance id at `/id.txt`, the numbers 1 to
/// 20000 at `/big.txt` (108,894 bytes) and four CGI probes: `ns?NAME` and
/// `srv?NAME` ask the node's resolver, `get?HOST:PORT` fetches that host's
/// `/id.txt` with `nc` (or says `unreachable`), `big?HOST:PORT` fetches its
/// `/big.txt` and says how many bytes of it came and its last line; a HOST
/// that is a name is first asked of the node's resolver.
const PROBE: &str = r#"mkdir -p /tmp/www/cgi-bin; /bin/busybox hostname > /tmp/www/id.txt
/bin/busybox seq 1 20000 > /tmp/www/big.txt
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
H=${QUERY_STRING%:*}
case $H in *[a-z]*) H=$(/bin/busybox nslookup $H 2>/dev/null | /bin/busybox sed -n 's/^Address:[[:space:]]*\([0-9.]*\)$/\1/p' | /bin/busybox tail -n 1) ;; esac
R=$(printf 'GET /id.txt HTTP/1.0\r\n\r\n' | /bin/busybox nc -w 3 $H ${QUERY_STRING##*:} | /bin/busybox tail -n 1)
if [ -n "$R" ]; then echo "$R"; else echo unreachable; fi
X
/bin/busybox cat > /tmp/www/cgi-bin/big <<'X'
#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
H=${QUERY_STRING%:*}
case $H in *[a-z]*) H=$(/bin/busybox nslookup $H 2>/dev/null | /bin/busybox sed -n 's/^Address:[[:space:]]*\([0-9.]*\)$/\1/p' | /bin/busybox tail -n 1) ;; esac
printf 'GET /big.txt HTTP/1.0\r\n\r\n' | /bin/busybox nc -w 10 $H ${QUERY_STRING##*:} > /tmp/big.$$
B=$(/bin/busybox awk 'b { n += length($0) + 1 } !b && length($0) <= 1 { b = 1 } END { print n + 0 }' /tmp/big.$$)
L=$(/bin/busybox tail -n 1 /tmp/big.$$)
/bin/busybox rm -f /tmp/big.$$
echo "$B $L"
X
/bin/busybox chmod +x /tmp/www/cgi-bin/ns /tmp/www/cgi-bin/srv /tmp/www/cgi-bin/get /tmp/www/cgi-bin/big
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
    // Everything was reachable before: the list took effect once the other port is not.
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe(a, "get", "198.51.100.2:81").await.trim() != "unreachable" {
        assert!(Instant::now() < deadline, "the allow-list by name never took effect\nfirewall:\n{}", ruleset());
    }
    assert_eq!(
        probe(a, "get", "198.51.100.2:80").await.trim(),
        "outside",
        "the name's address was not allowed\nfirewall:\n{}",
        ruleset()
    );
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

/// Set, with the node's name (`one`, `two`), in the copies of the two-node
/// test that play a node.
const NODE: &str = "ZEITWORK_TEST_PRIVNET_NODE";
/// The directory the two nodes share: where the operator is, readiness marks.
const SHARED: &str = "ZEITWORK_TEST_PRIVNET_DIR";
const TWO_NODES: &str = "instances_on_two_nodes_reach_their_own_project_by_name_and_no_other";

/// Node one's address on the wire between the nodes, and node two's.
const WIRE_ONE: &str = "192.0.2.1";
const WIRE_TWO: &str = "192.0.2.2";

/// Two nodes, each a network namespace of its own, joined by a veth pair
/// (192.0.2.1 and 192.0.2.2; nothing leaves the two). Node one runs the
/// operator, a registry and an agent (10.198.0.0/16); node two an agent
/// (10.197.0.0/16). Projects `web` (org acme) and `spy` (org other) have an
/// instance on each node.
#[test]
fn instances_on_two_nodes_reach_their_own_project_by_name_and_no_other() {
    if let Ok(node) = std::env::var(NODE) {
        let dir = std::path::PathBuf::from(std::env::var(SHARED).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build().unwrap();
        return match node.as_str() {
            "one" => runtime.block_on(node_one(&dir)),
            _ => runtime.block_on(node_two(&dir)),
        };
    }
    let id = std::process::id() % 100_000;
    let (one, two) = (format!("zwpn{id}one"), format!("zwpn{id}two"));
    let sh = |script: &str| {
        let out = std::process::Command::new("sh").args(["-c", script]).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let cleanup = || {
        for ns in [&one, &two] {
            let _ = std::process::Command::new("ip").args(["netns", "del", ns]).output();
        }
    };
    cleanup();
    sh(&format!(
        "ip netns add {one} && ip netns add {two} && ip -n {one} link set lo up && ip -n {two} link set lo up"
    ));
    sh(&format!("ip -n {one} link add wire type veth peer name wire netns {two}"));
    sh(&format!("ip -n {one} addr add {WIRE_ONE}/24 dev wire && ip -n {one} link set wire up"));
    sh(&format!("ip -n {two} addr add {WIRE_TWO}/24 dev wire && ip -n {two} link set wire up"));
    // Node one's process also asks node two's instances (as an edge would reach their agent).
    sh(&format!("ip -n {one} route add 10.197.0.0/16 via {WIRE_TWO}"));
    for ns in [&one, &two] {
        sh(&format!("nsenter --net=/run/netns/{ns} sh -c 'echo 1 > /proc/sys/net/ipv4/ip_forward'"));
    }
    let dir = tempfile::tempdir().unwrap();
    // nsenter, not `ip netns exec`: that one mounts a new /sys, hiding the cgroups runc needs.
    let spawn = |node: &str, ns: &str| {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", TWO_NODES, "--nocapture", "--test-threads", "1"])
            .env(NODE, node)
            .env(SHARED, dir.path())
            .spawn()
            .unwrap()
    };
    let (mut node_one, mut node_two) = (spawn("one", &one), spawn("two", &two));
    let first = node_one.wait().unwrap();
    // Node two stops once node one says so; if node one failed first, it waits no longer.
    let deadline = Instant::now() + Duration::from_secs(60);
    let second = loop {
        if let Some(status) = node_two.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = node_two.kill();
            let _ = node_two.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    cleanup();
    assert!(first.success(), "node one failed (output above): {first}");
    assert!(second.is_some_and(|s| s.success()), "node two failed or never stopped (output above): {second:?}");
}

/// Writes `file` whole in the shared dir (the other node polls for it).
fn mark(dir: &std::path::Path, file: &str, text: &str) {
    let tmp = dir.join(format!("{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, dir.join(file)).unwrap();
}

/// Waits up to `secs` for `file` in the shared dir and returns its contents.
async fn wait_for(dir: &std::path::Path, file: &str, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(s) = std::fs::read_to_string(dir.join(file)) {
            return s;
        }
        assert!(Instant::now() < deadline, "the other node never wrote {file}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An agent of the two-node test: on the wire address `ip`, running
/// containers from `range`, with a resolver and the tunnel on its default port.
fn node_config(
    base: &str,
    token: &str,
    dir: &std::path::Path,
    name: &str,
    ip: &str,
    range: &str,
) -> zeitwork_node_agent::NodeAgentConfig {
    let mut config = common::agent_config(base, token.to_owned(), &dir.join(name), name, range);
    config.listen = format!("{ip}:0").parse().unwrap();
    config.dns_port = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
    config.dns_upstreams = Some(Vec::new());
    config
}

/// Relays TCP connections to `listen` on to `to` (the registry listens on
/// node one's loopback only; node two pulls through this).
async fn relay(listen: &str, to: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    addr
}

/// The instance of `dep` on each node once both are ready (within `secs`):
/// ((id, link address) on node `one`, the same on the other node).
async fn one_on_each(admin: &Client, dep: &str, one: &str, secs: u64) -> ((String, String), (String, String)) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let is: Vec<Value> = admin.get(&format!("/api/v1/deployments/{dep}/instances")).await.unwrap();
        let ready: Vec<_> = is.iter().filter(|i| i["status"] == "ready").collect();
        let pick = |here: bool| {
            ready
                .iter()
                .find(|i| (i["node"] == one) == here)
                .map(|i| (i["id"].as_str().unwrap().to_owned(), i["address"].as_str().unwrap().to_owned()))
        };
        if let (2, Some(on_one), Some(on_two)) = (ready.len(), pick(true), pick(false)) {
            return (on_one, on_two);
        }
        assert!(Instant::now() < deadline, "{dep} never had a ready instance on each node: {is:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Packets the tunnel device `name` received (from `ip -s -j link`).
fn tunnel_rx_packets(name: &str) -> u64 {
    let out = std::process::Command::new("ip").args(["-s", "-j", "link", "show", "dev", name]).output().unwrap();
    assert!(out.status.success(), "no tunnel device {name}: {}", String::from_utf8_lossy(&out.stderr));
    let links: Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0)
}

/// Waits until a stopped agent has left neither its firewall table nor its tunnel device.
async fn left_nothing(table: &str, device: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let link = std::process::Command::new("ip").args(["link", "show", "dev", device]).output().unwrap();
        let listed = tables();
        if !link.status.success() && !listed.contains(table) {
            return;
        }
        assert!(Instant::now() < deadline, "a stopped agent left {table} or {device}: {listed}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn node_one(dir: &std::path::Path) {
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/probe", "v1", PROBE).await.unwrap();
    let registry = image.split('/').next().unwrap().to_owned();
    let relayed = relay(&format!("{WIRE_ONE}:0"), registry.clone()).await;
    let op = zeitwork_control_plane::Operator::start(OperatorConfig {
        listen: format!("{WIRE_ONE}:0").parse().unwrap(),
        data_dir: dir.join("op"),
        private_network: "100.100.0.0/16".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let base = format!("http://{}", op.addr());
    let admin = Client::new(&base, op.admin_token.clone());
    admin
        .post::<_, Value>("/api/v1/regions", &json!({"code": "local", "name": "Local", "country": "ZZ"}))
        .await
        .unwrap();
    let resources = json!({"vcpu": 1, "memory": 128});
    for (org, project) in [("acme", "web"), ("other", "spy")] {
        admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": org})).await.unwrap();
        let body = json!({"name": project, "org": org, "port": 8080, "resources": resources});
        admin.post::<_, Value>("/api/v1/projects", &body).await.unwrap();
    }
    let token = common::cluster_token(&admin, "node-agent").await;
    let shared = json!({"url": base, "token": token, "registry": registry, "relay": format!("http://{relayed}")});
    mark(dir, "operator.json", &shared.to_string());
    let agent = NodeAgent::start(node_config(&base, &token, dir, "one", WIRE_ONE, "10.198.0.0")).await.unwrap();
    let one = agent.node().id.clone();
    wait_for(dir, "two.up", 120).await;
    // Both nodes are ready before anything is placed, so each gets an instance of each project.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Vec<Value> = admin.get("/api/v1/nodes").await.unwrap();
        if nodes.iter().filter(|n| n["status"] == "ready").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the two nodes were never ready: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deploy = |org: &str, project: &str| {
        let (admin, image) = (admin.clone(), image.clone());
        let body = json!({"org": org, "project": project, "image": image, "instances_per_region": 2});
        async move {
            let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
            d["id"].as_str().unwrap().to_owned()
        }
    };
    let (web_dep, spy_dep) = (deploy("acme", "web").await, deploy("other", "spy").await);
    let ((web1_id, web1), (web2_id, web2)) = one_on_each(&admin, &web_dep, &one, 120).await;
    let ((spy1_id, spy1), (spy2_id, spy2)) = one_on_each(&admin, &spy_dep, &one, 120).await;
    assert!(web1.starts_with("10.198.") && web2.starts_with("10.197."), "{web1} {web2}");

    // The project's name lists its instances on both nodes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = probe(&web1, "ns", "web.internal").await;
        if addresses(&answer).len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "web.internal never listed both nodes' instances: {answer}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // By name, across the tunnel, both ways.
    let before = tunnel_rx_packets("zwg-10-198");
    reaches(&web1, &format!("{web2_id}.web.internal:8080"), &web2_id).await;
    reaches(&web2, &format!("{web1_id}.web.internal:8080"), &web1_id).await;
    assert!(tunnel_rx_packets("zwg-10-198") > before, "the answers did not come through the tunnel");
    // The other project's network crosses the same tunnel, between its own instances.
    reaches(&spy1, &format!("{spy2_id}.spy.internal:8080"), &spy2_id).await;
    reaches(&spy2, &format!("{spy1_id}.spy.internal:8080"), &spy1_id).await;

    // The other project's instances resolve none of web's names and reach none
    // of its addresses, on their node or the other; nor does web reach theirs.
    let private = |from: &str, name: String| {
        let from = from.to_owned();
        async move {
            let found = addresses(&probe(&from, "ns", &name).await);
            assert_eq!(found.len(), 1, "{name} from {from}: {found:?}");
            found[0]
        }
    };
    let (web1_private, web2_private) = (
        private(&web2, format!("{web1_id}.web.internal")).await,
        private(&web1, format!("{web2_id}.web.internal")).await,
    );
    let (spy1_private, spy2_private) = (
        private(&spy2, format!("{spy1_id}.spy.internal")).await,
        private(&spy1, format!("{spy2_id}.spy.internal")).await,
    );
    for spy in [&spy1, &spy2] {
        assert!(addresses(&probe(spy, "ns", "web.internal").await).is_empty(), "{spy} resolved web.internal");
        for name in [format!("{web1_id}.web.internal"), format!("{web2_id}.web.internal")] {
            assert!(addresses(&probe(spy, "ns", &name).await).is_empty(), "{spy} resolved {name}");
            assert_eq!(probe(spy, "get", &format!("{name}:8080")).await.trim(), "unreachable", "{spy} reached {name}");
        }
        for target in [web1_private, web2_private] {
            let got = probe(spy, "get", &format!("{target}:8080")).await;
            assert_eq!(got.trim(), "unreachable", "{spy} reached web at {target}\nfirewall:\n{}", ruleset());
        }
    }
    for (web, target) in [(&web1, spy2_private), (&web2, spy1_private), (&web1, spy1_private)] {
        assert_eq!(probe(web, "get", &format!("{target}:8080")).await.trim(), "unreachable", "{web} reached spy");
    }
    // A private address that is no one's goes nowhere.
    assert_eq!(probe(&web1, "get", "100.100.0.250:8080").await.trim(), "unreachable");

    // Each agent that stops takes its table and its tunnel device with it.
    mark(dir, "done", "");
    agent.shutdown().await;
    left_nothing("zeitwork_10_198", "zwg-10-198").await;
    wait_for(dir, "two.stopped", 120).await;
    drop(op);
}

async fn node_two(dir: &std::path::Path) {
    let shared: Value = serde_json::from_str(&wait_for(dir, "operator.json", 180).await).unwrap();
    let text = |k: &str| shared[k].as_str().unwrap().to_owned();
    let mut config = node_config(&text("url"), &text("token"), dir, "two", WIRE_TWO, "10.197.0.0");
    config.registries.endpoints.insert(text("registry"), text("relay"));
    let agent = NodeAgent::start(config).await.unwrap();
    assert!(tables().contains("zeitwork_10_197"), "{}", tables());
    mark(dir, "two.up", "");
    wait_for(dir, "done", 600).await;
    agent.shutdown().await;
    left_nothing("zeitwork_10_197", "zwg-10-197").await;
    mark(dir, "two.stopped", "");
}

const MIXED: &str = "a_container_and_a_microvm_of_one_project_reach_each_other_and_no_one_else";

/// One project's network across runtimes: a container node (range
/// 10.186.0.0/16) and a QEMU microVM node (10.187.0.0/16; KVM when it works
/// here, TCG otherwise), two agents on one host joined by their tunnel.
/// Project `web` has an instance on each: each finds the other by the
/// project's name, by the other's full name and by its short name (the
/// search domain), and fetches the other's id on its private address. A
/// container of another org's project resolves none of web's names and
/// reaches neither instance, on its private or its link address; the microVM
/// reaches neither that container nor a service of the host.
#[test]
fn a_container_and_a_microvm_of_one_project_reach_each_other_and_no_one_else() {
    if std::env::var_os(INSIDE).is_none() {
        return run_in_own_netns(MIXED);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(container_and_microvm());
}

/// A service of the host on every address of it: answers `host` over HTTP and
/// counts the connections it took.
async fn host_service() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let taken = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhost\n").await;
            });
        }
    });
    (port, taken)
}

/// The host's end of the /30 of an instance at link address `link` (`ip:port`).
fn gateway_of(link: &str) -> Ipv4Addr {
    let ip: Ipv4Addr = link.split(':').next().unwrap().parse().unwrap();
    Ipv4Addr::from(u32::from(ip) - 1)
}

async fn container_and_microvm() {
    let began = Instant::now();
    let reg = zeitwork_testkit::Registry::start().unwrap();
    let image = reg.push_busybox("acme/probe", "v1", PROBE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let project = json!({"name": "web", "org": "acme", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    let config = OperatorConfig { private_network: "100.100.0.0/16".into(), ..Default::default() };
    let (op, base, admin) = common::operator(dir.path(), config, project).await;
    admin.post::<_, Value>("/api/v1/orgs", &json!({"slug": "other"})).await.unwrap();
    let spy = json!({"name": "spy", "org": "other", "port": 8080, "resources": {"vcpu": 1, "memory": 128}});
    admin.post::<_, Value>("/api/v1/projects", &spy).await.unwrap();
    let token = common::cluster_token(&admin, "node-agent").await;
    // Two agents on this host, one per runtime, each with its range, resolver
    // and tunnel. The container node offers more memory, so a deployment of one
    // instance goes there (placement spreads a deployment first, then takes the
    // node with the most free memory).
    let start = |name: &str, range: &str, runtime: &str, memory: u32| {
        let mut config = common::agent_config(&base, token.clone(), &dir.path().join(name), name, range);
        config.runtime = runtime.into();
        config.memory = Some(memory);
        // A guest boots in 20 to 60 s under TCG on a busy machine.
        config.start_timeout_secs = 300;
        config.dns_port = std::net::UdpSocket::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port();
        config.dns_upstreams = Some(Vec::new());
        config.tunnel_port = zeitwork_testkit::free_udp_port();
        NodeAgent::start(config)
    };
    let ct = start("ct-node", "10.186.0.0", "container", 8192).await.unwrap();
    let vm = start("vm-node", "10.187.0.0", "qemu", 4096).await.unwrap();
    assert_eq!(vm.node().runtime, "qemu");
    let detail = vm.node().runtime_detail.clone().unwrap_or_default();
    assert!(detail.contains("kvm") || detail.contains("tcg"), "{detail}");
    assert!(device_exists("zwg-10-186") && device_exists("zwg-10-187"), "each agent has a tunnel device");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes: Vec<Value> = admin.get("/api/v1/nodes").await.unwrap();
        if nodes.iter().filter(|n| n["status"] == "ready").count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the two nodes were never ready: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deploy = |org: &str, project: &str, n: u32| {
        let (admin, image) = (admin.clone(), image.clone());
        let body = json!({"org": org, "project": project, "image": image, "instances_per_region": n});
        async move {
            let d: Value = admin.post("/api/v1/deployments", &body).await.unwrap();
            d["id"].as_str().unwrap().to_owned()
        }
    };
    let (web_dep, spy_dep) = (deploy("acme", "web", 2).await, deploy("other", "spy", 1).await);
    let deployed = Instant::now();
    let ((c_id, c), (v_id, v)) = one_on_each(&admin, &web_dep, &ct.node().id, 360).await;
    let booted = deployed.elapsed();
    assert!(c.starts_with("10.186.") && v.starts_with("10.187."), "container {c}, microVM {v}");
    let listed: Vec<Value> = admin.get(&format!("/api/v1/deployments/{web_dep}/instances")).await.unwrap();
    let runtime = |id: &str| listed.iter().find(|i| i["id"] == id).map(|i| i["runtime"].clone());
    assert_eq!((runtime(&c_id), runtime(&v_id)), (Some(json!("container")), Some(json!("qemu"))), "{listed:?}");
    let spies = ready_instances(&admin, &spy_dep, 1).await;
    let (s_id, s) = &spies[0];
    assert!(s.starts_with("10.186."), "the spy runs in a container: {s}");

    // The project's name lists both, from either side, on its private /24.
    for from in [&c, &v] {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = probe(from, "ns", "web.internal").await;
            let listed = addresses(&answer);
            if listed.len() == 2 {
                let net = |ip: &Ipv4Addr| <[u8; 3]>::try_from(&ip.octets()[..3]).unwrap();
                assert!(listed.iter().all(|ip| net(ip)[..2] == [100, 100] && net(ip) == net(&listed[0])), "{listed:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "web.internal from {from} never listed both: {answer}\nfirewall:\n{}",
                ruleset()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    // Each by its full name and by its short name (the search domain), from the other.
    let one = |from: &str, name: String| {
        let from = from.to_owned();
        async move {
            let found = addresses(&probe(&from, "ns", &name).await);
            assert_eq!(found.len(), 1, "{name} from {from}: {found:?}");
            found[0]
        }
    };
    let v_private = one(&c, format!("{v_id}.web.internal")).await;
    let c_private = one(&v, format!("{c_id}.web.internal")).await;
    assert_eq!(one(&c, v_id.clone()).await, v_private, "the short name from the container");
    assert_eq!(one(&v, c_id.clone()).await, c_private, "the short name from the microVM");
    let srv = probe(&v, "srv", "_http._tcp.web.internal").await;
    assert!(srv.contains("8080") && srv.contains(&format!("{c_id}.web.internal")), "{srv}");
    // They talk on their private addresses (across the tunnel between the nodes), by address and by name.
    let before = tunnel_rx_packets("zwg-10-187");
    reaches(&c, &format!("{v_private}:8080"), &v_id).await;
    reaches(&v, &format!("{c_private}:8080"), &c_id).await;
    reaches(&c, &format!("{v_id}:8080"), &v_id).await;
    reaches(&v, &format!("{c_id}.web.internal:8080"), &c_id).await;
    assert!(tunnel_rx_packets("zwg-10-187") > before, "the microVM's node heard nothing through the tunnel");
    // A page of many full-sized packets, larger than the tunnel's MTU, both ways.
    for (from, to) in [(&c, format!("{v_private}:8080")), (&v, format!("{c_private}:8080"))] {
        let got = probe(from, "big", &to).await;
        assert_eq!(got.trim(), "108894 20000", "{from} fetched {to}/big.txt whole");
    }

    // Another org's container: no name of web resolves, no address of either answers.
    assert!(addresses(&probe(s, "ns", "web.internal").await).is_empty(), "the spy resolved web.internal");
    for name in [format!("{c_id}.web.internal"), format!("{v_id}.web.internal")] {
        assert!(addresses(&probe(s, "ns", &name).await).is_empty(), "the spy resolved {name}");
    }
    let link = |a: &str| a.split(':').next().unwrap().to_owned();
    for target in [c_private.to_string(), v_private.to_string(), link(&c), link(&v)] {
        let got = probe(s, "get", &format!("{target}:8080")).await;
        assert_eq!(got.trim(), "unreachable", "the spy reached {target}\nfirewall:\n{}", ruleset());
    }
    // Nor does the microVM reach the spy, on its private or its link address, or resolve its names.
    let s_private = one(s, format!("{s_id}.spy.internal")).await;
    assert!(addresses(&probe(&v, "ns", "spy.internal").await).is_empty(), "the microVM resolved spy.internal");
    for target in [s_private.to_string(), link(s)] {
        assert_eq!(
            probe(&v, "get", &format!("{target}:8080")).await.trim(),
            "unreachable",
            "the microVM reached {target}"
        );
    }
    // Nor a service of the host: on its own gateway or the container node's.
    let (port, taken) = host_service().await;
    let gateways = [gateway_of(&v), gateway_of(&c)];
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    for gw in gateways {
        let body = http.get(format!("http://{gw}:{port}/id.txt")).send().await.unwrap().text().await.unwrap();
        assert_eq!(body, "host\n", "the host reaches its own service on {gw}, so a probe failing proves something");
    }
    for gw in gateways {
        let got = probe(&v, "get", &format!("{gw}:{port}")).await;
        assert_eq!(
            got.trim(),
            "unreachable",
            "the microVM reached the host's service on {gw}\nfirewall:\n{}",
            ruleset()
        );
    }
    assert_eq!(
        taken.load(std::sync::atomic::Ordering::SeqCst),
        gateways.len(),
        "only the host's own connections got through"
    );
    // The network still carries the project's traffic.
    reaches(&v, &format!("{c_private}:8080"), &c_id).await;

    vm.shutdown().await;
    ct.shutdown().await;
    drop(op);
    eprintln!(
        "container and microVM ({detail}) on one network: both ready {} s after the deployment, test {} s",
        booted.as_secs(),
        began.elapsed().as_secs()
    );
}
